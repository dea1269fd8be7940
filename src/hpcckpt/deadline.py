"""Deadlines for hpcckpt's collectives, and the end of a job whose rank failed.

No collective of ours waits forever: each one is nonblocking and tested in a loop that backs
off to short sleeps (so a waiting rank leaves the CPU to the application's threads and to the
export helper); past the deadline the job is aborted with one message saying what it waited
for.  An uncaught exception on any rank ends the whole job: the traceback first, then
``MPI_Abort`` (as ``python -m mpi4py`` does), so ``mpiexec`` and ``srun`` return and
``hpcckpt run`` can relaunch.

>>> import hpcckpt.deadline as d
>>> d.parse_timeout("90")
90.0
>>> d.parse_timeout("0")      # 0 turns deadlines off: plain blocking collectives
0.0
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

DEFAULT_TIMEOUT = 600.0
EXIT_DEADLINE = 124       # the job's exit status when a deadline passed (as timeout(1) uses)
_SPIN = 0.002             # test without sleeping this long first (yielding the CPU between tests)
_MAX_PAUSE = 0.002        # the longest sleep between two tests


def parse_timeout(text: str | float | None, where: str = "HPCCKPT_TIMEOUT") -> float:
    """Seconds from `text` (None: the default); a bad value is refused in one line."""
    if text is None or text == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={text!r}: give the seconds a collective of hpcckpt may wait, "
                         f"e.g. {int(DEFAULT_TIMEOUT)} (0 turns the deadline off)")
    return value


_timeout: float | None = None


_from_env: tuple[str | None, float] | None = None   # $HPCCKPT_TIMEOUT as last read, and its value


def timeout() -> float:
    """The deadline of every collective in seconds: ``hpcckpt.open(timeout=)``, else
    ``$HPCCKPT_TIMEOUT``, else 600; 0 means none."""
    global _from_env
    if _timeout is not None:
        return _timeout
    text = os.environ.get("HPCCKPT_TIMEOUT")
    if _from_env is None or _from_env[0] != text:   # parsed once, not at every collective
        _from_env = (text, parse_timeout(text))
    return _from_env[1]


def set_timeout(seconds: float | None) -> None:
    """Set the process's deadline (None: back to ``$HPCCKPT_TIMEOUT`` or the default)."""
    global _timeout
    _timeout = None if seconds is None else parse_timeout(seconds, "timeout")


def wait(request: Any, what: str) -> None:
    """Complete `request` (an MPI request) or abort the job once the deadline has passed.

    Tests for 2 ms yielding the CPU between tests (a vote whose ranks arrive together ends in
    that time), then sleeps between tests, up to 2 ms at a time: MPI progresses a nonblocking
    collective only inside a test, so one whose last rank arrives late completes within a few
    ms of its arrival.
    """
    limit = timeout()
    if limit <= 0:
        request.Wait()
        return
    t0 = time.monotonic()
    pause = 0.0
    while not request.Test():
        waited = time.monotonic() - t0
        if waited < _SPIN:
            os.sched_yield()   # a rank sharing this CPU runs now (ranks may outnumber CPUs)
            continue
        if waited > limit:
            expire(what, waited)
        _answer(what)
        pause = min(max(pause * 1.5, 50e-6), _MAX_PAUSE)
        time.sleep(pause)


def arrive(comm: Any, what: str) -> None:
    """Wait (with the deadline) until every rank of `comm` has reached this point: a blocking
    collective right after it cannot hang on a rank that never comes."""
    if timeout() > 0:
        wait(comm.Ibarrier(), what)


def allgather(comm: Any, obj: Any, what: str) -> list:
    """``comm.allgather(obj)`` under the deadline."""
    arrive(comm, what)
    return comm.allgather(obj)


def bcast(comm: Any, obj: Any, what: str, root: int = 0) -> Any:
    """``comm.bcast(obj, root)`` under the deadline."""
    arrive(comm, what)
    return comm.bcast(obj, root=root)


def allreduce(comm: Any, send: Any, recv: Any, op: Any, what: str) -> None:
    """``comm.Allreduce(send, recv, op)`` under the deadline (nonblocking, tested)."""
    if timeout() <= 0:
        comm.Allreduce(send, recv, op=op)
        return
    wait(comm.Iallreduce(send, recv, op=op), what)


_census: Any = None   # a communicator of its own: "where do you wait?" when a deadline passes
_ASK, _HERE = 1, 2
_replies: list = []


def enable_census(comm: Any) -> None:
    """Collective (``hpcckpt.open``, once per process): give the job a communicator on which,
    when a deadline passes, the rank that gives up asks the others where they wait."""
    global _census
    if _census is None and comm.Get_size() > 1:
        arrive(comm, "the ranks' agreement at open")
        _census = comm.Dup()


def _answer(what: str) -> None:
    """Tell every rank that asks that this one waits for `what` (called between tests)."""
    c = _census
    if c is None:
        return
    from mpi4py import MPI
    st = MPI.Status()
    while c.Iprobe(source=MPI.ANY_SOURCE, tag=_ASK, status=st):
        c.Recv(bytearray(0), source=st.Get_source(), tag=_ASK)
        buf = what.encode()
        _replies.append((c.Isend(buf, dest=st.Get_source(), tag=_HERE), buf))
    _replies[:] = [(r, b) for r, b in _replies if not r.Test()]


def _who_waits(what: str, grace: float = 2.0) -> str:
    """Ask every rank where it waits; in words, who waits here, who elsewhere, who never came."""
    c = _census
    if c is None:
        return "ranks that do not report the same never arrived"
    from mpi4py import MPI
    me, n = c.Get_rank(), c.Get_size()
    asks = [c.Isend(bytearray(0), dest=r, tag=_ASK) for r in range(n) if r != me]
    seen: dict[int, str] = {}
    end, st = time.monotonic() + grace, MPI.Status()
    while time.monotonic() < end and len(seen) < n - 1:
        _answer(what)
        if c.Iprobe(source=MPI.ANY_SOURCE, tag=_HERE, status=st):
            buf = bytearray(st.Get_count(MPI.BYTE))
            c.Recv(buf, source=st.Get_source(), tag=_HERE)
            seen[st.Get_source()] = buf.decode(errors="replace")
        else:
            time.sleep(0.001)
    _replies.extend((r, b"") for r in asks)   # unanswered asks are left to the abort
    missing = sorted(set(range(n)) - set(seen) - {me})
    said = [f"rank(s) {missing} never arrived (no answer in {grace:g} s)"] if missing else []
    said += [f"rank {r} waits for {w}" for r, w in sorted(seen.items()) if w != what]
    here = sorted(r for r, w in seen.items() if w == what)
    said += [f"rank(s) {here} wait here too"] if here else []
    return "; ".join(said)


def expire(what: str, waited: float) -> None:
    """The deadline of `what` has passed: find out where the other ranks wait, say it in one
    line and abort the job."""
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    where = _who_waits(what)
    message = (f"hpcckpt: rank {rank} waited {waited:.0f} s for {what} and gives up (the deadline, "
               f"HPCCKPT_TIMEOUT or hpcckpt.open(timeout=), is {timeout():g} s); {where}. Each rank must make "
               "the same hpcckpt calls in the same order. Aborting the job")
    abort(message, EXIT_DEADLINE)


def abort(message: str, code: int = 1) -> None:
    """Print `message`, leave it for ``hpcckpt run`` and end the whole job with ``MPI_Abort``."""
    print(message, file=sys.stderr, flush=True)
    _tell_relauncher(message)
    _let_output_drain()
    from mpi4py import MPI
    MPI.COMM_WORLD.Abort(code)


def _let_output_drain() -> None:
    """A moment for the launcher to forward what this rank printed: MPI_Abort makes mpiexec
    tear the job down, and under load it dropped a traceback still in the pipe."""
    time.sleep(0.2)


def _tell_relauncher(message: str) -> None:
    """Under ``hpcckpt run``: the reason this attempt ended, one line in its status file."""
    _status_lines(["error: " + " ".join(message.split())[:500]])


def record_segments() -> None:
    """Under ``hpcckpt run`` (or a test that gives HPCCKPT_RUN_STATUS): record the MPICH
    shared-memory segments this rank maps, the proof that they are this job's own, so that
    the segments a killed attempt leaves behind can be removed and no other job's."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:
        return
    mine = sorted({f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/dev/shm/mpich_")})
    _status_lines([f"segment: {path}" for path in mine])


def _status_lines(lines: list[str]) -> None:
    status = os.environ.get("HPCCKPT_RUN_STATUS")
    if status and lines:
        try:
            with open(status, "a") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError:
            pass


def install_abort_hook() -> None:
    """Make an uncaught exception end the whole job: traceback first, then ``MPI_Abort(1)``.

    Installed by ``hpcckpt.open`` (``abort_on_error=False`` leaves ``sys.excepthook`` alone).
    Chains to the hook it finds, which prints the traceback.  ``SystemExit`` never reaches a
    hook: a program that ends one rank on purpose calls ``comm.Abort(code)``.
    """
    previous = sys.excepthook
    if getattr(previous, "_hpcckpt", False):
        return

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        try:
            previous(kind, value, tb)
        finally:
            sys.stderr.flush()
            from mpi4py import MPI
            if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
                print(f"hpcckpt: rank {MPI.COMM_WORLD.Get_rank()} ended by {kind.__name__}; aborting the job "
                      "(MPI_Abort)", file=sys.stderr, flush=True)
                _tell_relauncher(f"{kind.__name__}: {value}")
                _let_output_drain()
                MPI.COMM_WORLD.Abort(1)
    hook._hpcckpt = True   # type: ignore[attr-defined]
    sys.excepthook = hook


__all__ = ["enable_census", "timeout", "set_timeout", "parse_timeout", "wait", "arrive", "allgather", "bcast",
           "allreduce",
           "abort", "install_abort_hook", "DEFAULT_TIMEOUT"]
