"""Running MPI jobs from tests: the real mpiexec through the relauncher, in their own
process group, killed as a group on timeout (a hang fails the test, it does not stall CI)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from hpcckpt.run import kill_tree, remove_recorded_segments

DEMO = ["--nx", "96", "--ny", "64", "--particles", "4000", "--steps", "30", "--checkpoint-every", "5",
        "--capacity", "64MiB"]


def launch(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group is killed.

    Its ranks record the MPICH segments they map in a status file of the test's own (as under
    ``hpcckpt run``, which keeps one per attempt); once the job has ended, those that no live
    process maps are removed, and nothing else in /dev/shm."""
    fd, status = tempfile.mkstemp(prefix="hpcckpt-test-", suffix=".status")
    os.close(fd)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HPCCKPT_RUN_STATUS=status, **(env or {})), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)   # the ranks too: hydra starts them in sessions of their own
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
        remove_recorded_segments(status)
        os.unlink(status)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def demo(n: int, root: str, *extra: str, restarts: int = 0, env: dict | None = None, name: str = "t"):
    """``hpcckpt run -n N -- python -m hpcckpt.demo ...``; returns the process and its checksum line."""
    cmd = [sys.executable, "-m", "hpcckpt", "run", "-n", str(n), "--max-restarts", str(restarts), "--",
           sys.executable, "-m", "hpcckpt.demo", *DEMO, "--root", root, "--name", name, *extra]
    proc = launch(cmd, env)
    sums = [line for line in proc.stdout.splitlines() if line.startswith("checksum: ")]
    return proc, sums[-1] if sums else None


_reference: dict[int, str] = {}


def reference(n: int, root: str) -> str:
    """The failure-free answer at n ranks, with no hpcckpt at all."""
    if n not in _reference:
        proc, line = demo(n, root, "--no-checkpoint", name="reference")
        assert proc.returncode == 0 and line, proc.stderr
        _reference[n] = line
    return _reference[n]
