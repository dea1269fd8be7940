"""Relaunch an MPI job until it succeeds: ``hpcckpt run -n N -- cmd args...``.

Runs ``mpiexec -n N cmd args...``; when it exits non-zero, runs it again (up to
``--max-restarts`` times) so that the application resumes from its last committed
checkpoint, as ``scr_srun`` does. Each attempt sees ``HPCCKPT_ATTEMPT=1, 2, ...``.
SIGTERM and SIGINT are forwarded to the running job and end the relaunching;
SIGUSR1 and SIGUSR2 are forwarded only (e.g. "checkpoint now"). A second SIGTERM or
SIGINT kills the launcher, whose proxies then kill the ranks.

Example::

    $ hpcckpt run -n 4 --max-restarts 2 -- python -m hpcckpt.demo --kill-rank 2 --kill-at-step 55
    hpcckpt run: attempt 1/3 exited with 9; relaunching
    hpcckpt run: attempt 2/3 succeeded

This module uses only the standard library, so ``python hpcckpt/run.py`` works too.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PASS_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def find_mpiexec() -> str:
    """The ``mpiexec`` next to the running Python (the ``mpich`` wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise SystemExit("hpcckpt run: no mpiexec found; `pip install mpich` or pass --mpiexec PATH")
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL the process groups of ``pid`` and of all its descendants.

    Hydra's proxy and each rank run in sessions of their own, so the launcher's group alone
    would miss them (a hung job leaves its ranks running otherwise). Example: ``kill_tree(proc.pid)``.
    """
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(Path(stat).read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    tree, todo = [pid], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        tree += kids
        todo += kids
    ours = os.getpgrp()
    for p in tree:
        try:
            group = os.getpgid(p)
            os.kill(p, signal.SIGKILL) if group == ours else os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


SEGMENT_PREFIX = "/dev/shm/mpich_"   # MPICH's shared memory: a killed rank leaves its segment behind
# The status file of an attempt (HPCCKPT_RUN_STATUS), written by the ranks (hpcckpt.deadline):
# "resumes job ..."/"starts job ..." once rank 0 has opened the heaps, "segment: PATH" for each
# MPICH segment a rank maps, "error: TEXT" for the error that ended the job.


def _mapped(paths: set[str]) -> set[str]:
    """Those of `paths` that some live process maps."""
    found = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:
            continue
        found |= {path for path in paths if path in text}
    return found


def remove_recorded_segments(status: str, settle: float = 5.0) -> list[str]:
    """After an attempt has ended: remove the segments its ranks recorded in `status` that no
    live process maps any more.  Nothing else in /dev/shm is touched (another job's segment,
    even one whose MPI_Init is creating it now, was never recorded here).  Returns the removed."""
    try:
        with open(status) as f:
            recorded = {line[9:].strip() for line in f if line.startswith("segment: ")}
    except OSError:
        return []
    recorded = {p for p in recorded if p.startswith(SEGMENT_PREFIX) and "/" not in p[len("/dev/shm/"):]}
    if not recorded:
        return []
    free, limit = set(), time.monotonic() + settle
    while True:   # ranks killed a moment ago may still be unmapping: wait for that, bounded
        free = recorded - _mapped(recorded)
        if free == recorded or time.monotonic() > limit:
            break
        time.sleep(0.05)
    removed = []
    for path in sorted(free):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


_KILLED = {signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL}


def by_signal(code: int) -> bool:
    """Did the attempt end by a signal?  Popen says -N; a shell 128+N; hydra gives the signal
    number of a rank that was killed."""
    return code < 0 or code > 128 or code in _KILLED


def describe(code: int) -> str:
    """``137`` -> ``'137 (killed by SIGKILL)'``; a negative code is the launcher's own death."""
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    try:
        return f"{code} (killed by {signal.Signals(sig).name})" if sig else str(code)
    except ValueError:
        return str(code)


class Relauncher:
    """Runs the command attempt by attempt; forwards signals to the live attempt."""

    def __init__(self, command: list[str], attempts: int) -> None:
        self.command, self.attempts = command, attempts
        self.child: subprocess.Popen | None = None
        self.stopped_by: signal.Signals | None = None
        self.status = ""   # hpcckpt.open adds lines: where the job resumes, the MPICH segments, an error
        self.history: list[dict] = []   # one record per attempt, for --json

    def on_signal(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        escalate = sig in STOP_SIGNALS and self.stopped_by is not None
        if sig in STOP_SIGNALS:
            self.stopped_by = sig
        if self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL if escalate else sig)

    def attempt(self, number: int) -> int:
        env = {**os.environ, "HPCCKPT_ATTEMPT": str(number), "HPCCKPT_RUN_STATUS": self.status}
        with open(self.status, "w"):
            pass
        self.child = subprocess.Popen(self.command, env=env, start_new_session=True)
        try:
            return self.child.wait()
        finally:
            self.reap()
            remove_recorded_segments(self.status)

    def reap(self) -> None:
        """Kill whatever the attempt left behind in its process group, and wait for it."""
        child = self.child
        if child.poll() is None:
            kill_tree(child.pid)   # hydra's proxies and ranks run in sessions of their own
        child.wait()
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.child = None

    def outcome(self) -> tuple[bool, str | None, str | None]:
        """What the last attempt left in its status file: (did it open its heaps, where it
        resumed, the error that ended it)."""
        try:
            with open(self.status) as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError:
            lines = []
        errors = [line[7:] for line in lines if line.startswith("error: ")]
        where = [line for line in lines if not line.startswith(("error: ", "segment: "))]
        return bool(where), where[0] if where else None, errors[0] if errors else None

    def run(self) -> int:
        old = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS + PASS_SIGNALS}
        fd, self.status = tempfile.mkstemp(prefix="hpcckpt-run-", suffix=".status")
        os.close(fd)
        try:
            code, unopened, last = 0, 0, None
            for number in range(1, self.attempts + 1):
                if self.stopped_by:
                    break
                code = self.attempt(number)
                head = f"hpcckpt run: attempt {number}/{self.attempts}"
                opened, where, error = self.outcome()
                self.history.append({"attempt": number, "exit": code, "exit_text": describe(code),
                                     "by_signal": code != 0 and by_signal(code) and error is None,
                                     "opened": opened, "resumed": where, "error": error})
                if code == 0:
                    log(f"{head} succeeded")
                    break
                signalled = by_signal(code) and error is None
                # only an error status before any heap opened counts: a signal is the node's doing
                unopened = 0 if opened or signalled else unopened + 1
                if unopened == 2:   # the same failure before any heap: a restart cannot fix it
                    log(f"{head} exited with {describe(code)}; attempts {number - 1} and {number} died before "
                        "opening their heaps (hpcckpt.open), so relaunching cannot help; giving up")
                    break
                if error is not None and last == (where, error):
                    log(f"{head} exited with {describe(code)}; attempts {number - 1} and {number} ended with the "
                        f"same error from the same checkpoint ({error}), so relaunching cannot help; giving up")
                    break
                last = (where, error) if error is not None else None
                if self.stopped_by:
                    log(f"{head} exited with {describe(code)}; not relaunching after {self.stopped_by.name}")
                elif number == self.attempts:
                    log(f"{head} exited with {describe(code)}; giving up")
                else:
                    log(f"{head} exited with {describe(code)}; relaunching")
            return 128 - code if code < 0 else code
        finally:
            os.unlink(self.status)
            for s, handler in old.items():
                signal.signal(s, handler)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hpcckpt run",
        usage="hpcckpt run [-h] -n N [--max-restarts R] [--mpiexec PATH] [--json] -- command [args ...]",
        description="Run an MPI job under mpiexec and relaunch it after a failure.",
        epilog="example: hpcckpt run -n 4 -- python app.py --steps 100",
    )
    parser.add_argument("-n", "--np", type=int, required=True, metavar="N", help="number of ranks")
    parser.add_argument("--max-restarts", type=int, default=3, metavar="R",
                        help="relaunch at most R times after a failure (default 3)")
    parser.add_argument("--mpiexec", metavar="PATH", help="launcher (default: the one beside python, else on PATH)")
    parser.add_argument("--json", action="store_true",
                        help="at the end, one JSON document as the last line of stdout: every attempt's exit, "
                             "where it resumed, the error that ended it")
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_known_args(argv[:cut])
    args.command = argv[cut + 1:]
    if extra or not args.command:
        example = " ".join(extra) or "python app.py"
        parser.error(f"put the command after --, e.g. hpcckpt run -n {args.np} -- {example}")
    if args.np < 1 or args.max_restarts < 0:
        parser.error("need -n >= 1 and --max-restarts >= 0")
    program = args.command[0]
    runnable = shutil.which(program) if os.sep not in program else (program if os.access(program, os.X_OK) else None)
    if runnable is None:   # it would fail the same way on every attempt: never relaunch it
        parser.error(f"{program}: no such program (not executable, or not on PATH); nothing was started")
    return args


def main(argv: list[str]) -> int:
    """Entry point of ``hpcckpt run``; returns the exit code of the last attempt."""
    args = parse(argv)
    launcher = args.mpiexec or find_mpiexec()
    command = [launcher, "-n", str(args.np), *args.command]
    relauncher = Relauncher(command, args.max_restarts + 1)
    code = relauncher.run()
    if args.json:
        print(json.dumps({"exit": code, "attempts": relauncher.history}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
