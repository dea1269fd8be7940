"""MPI coordination: collective agreement, coordinated checkpoints (every rank prepares,
one Allreduce decides) and the check that distributed objects tile their global shapes.

The heap below knows nothing of MPI; :class:`hpcckpt.job.JobHeap` builds on this module.

>>> from mpi4py import MPI                                   # doctest: +SKIP
>>> heap = hpcckpt.open("heat", comm=MPI.COMM_WORLD)           # doctest: +SKIP
>>> epoch = heap.checkpoint(step=10)                          # doctest: +SKIP
"""
from __future__ import annotations

import getpass
import os
import signal
import stat
from typing import Protocol

import numpy as np

from .errors import CheckpointError, HeapError, OwnerMismatchError
from . import deadline
from ._progress import watch
from .heap import Heap, block_shape, crash_hook, _call

_NUMERIC = ("objects_dirty", "units_dirty", "bytes_dirty", "bytes_copied", "bytes_meta", "bytes_page_baseline",
            "pages_dirty", "views_degraded", "faults", "t_scan", "t_copy", "t_flush", "t_commit", "t_nvm_delay")
_TIMES = {k for k in _NUMERIC if k.startswith("t_")}


def default_root() -> str:
    """Where heaps live: $HPCCKPT_ROOT, else /dev/shm/hpcckpt-$USER (node-local tmpfs)."""
    return os.environ.get("HPCCKPT_ROOT") or f"/dev/shm/hpcckpt-{getpass.getuser()}"


def error_text(e: BaseException) -> str:
    """How one rank's error travels to the others."""
    return f"{type(e).__name__}: {e}"


def agree(comm, ok_or_error: str | None, cls: type[Exception] = HeapError,
          what: str = "the ranks' agreement at open") -> None:
    """Raise the same error on every rank if any rank reported one (an ``error_text``).

    When every failed rank raised the same hpcckpt error class (or FileNotFoundError,
    PermissionError, ValueError), every rank raises that class, so ``except`` works under MPI.
    """
    if not any_rank(comm, ok_or_error is not None, what):   # one fixed-size reduction; texts only on failure
        return
    errors = deadline.allgather(comm, ok_or_error, what)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise error_class([e for _, e in failed], cls)(f"on rank(s) {ranks}: {failed[0][1]}")


def any_rank(comm, flag: bool, what: str = "the ranks' agreement at open") -> bool:
    """True on every rank if `flag` is true on any: one Allreduce of one value."""
    return bool(reduce_max(comm, [float(flag)], what)[0])


def first_error(comm, err: str | None, what: str = "the ranks' agreement at open") -> str | None:
    """The first rank's error text if any rank has one (texts travel only then), else None."""
    if not any_rank(comm, err is not None, what):
        return None
    return next(e for e in deadline.allgather(comm, err, what) if e)


def reduce_max(comm, values: list[float], what: str = "the ranks' agreement at open") -> np.ndarray:
    """Element-wise maximum over the ranks (a minimum travels negated): O(log N) time, the same
    bytes per rank at any rank count; aborts the job past the deadline (`what` names it)."""
    from mpi4py import MPI   # here, not at import: a single-process user never initialises MPI
    out = np.empty(len(values))
    deadline.allreduce(comm, np.asarray(values, dtype=float), out, MPI.MAX, what)
    return out


_MAX_SUM = None   # the MPI op of reduce_max_sum, made once


def _max_then_sum(inbuf, inout, datatype) -> None:
    """MPI user op: element 0 says how many of the elements that follow combine by maximum;
    the rest add up."""
    a, b = np.frombuffer(inbuf, float), np.frombuffer(inout, float)
    m = 1 + int(a[0])
    np.maximum(a[:m], b[:m], out=b[:m])
    b[m:] += a[m:]


def reduce_max_sum(comm, maxima: list[float], sums: list[float],
                   what: str = "a checkpoint's vote") -> tuple[np.ndarray, np.ndarray]:
    """Element-wise maximum of `maxima` and sum of `sums` over the ranks, in one Allreduce (a
    commutative user op): one round of messages, the same bytes per rank at any N."""
    global _MAX_SUM
    from mpi4py import MPI
    if _MAX_SUM is None:
        _MAX_SUM = MPI.Op.Create(_max_then_sum, commute=True)
    send = np.asarray([len(maxima), *maxima, *sums], dtype=float)
    out = np.empty_like(send)
    deadline.allreduce(comm, send, out, _MAX_SUM, what)
    return out[1:1 + len(maxima)], out[1 + len(maxima):]


def error_class(texts: list[str], default: type[Exception] = HeapError) -> type[Exception]:
    """The class named by every one of these ``error_text``s, if they agree and it is known."""
    kinds = {t.split(":", 1)[0] for t in texts}
    known = {c.__name__: c for c in _subclasses(HeapError) + [FileNotFoundError, PermissionError, ValueError]}
    return known.get(kinds.pop(), default) if len(kinds) == 1 else default


def _subclasses(c: type) -> list[type]:
    return [c] + [d for s in c.__subclasses__() for d in _subclasses(s)]


def private_dir(path: str) -> None:
    """Create the job directory `path` (0700) under its root if needed, and refuse a place where
    another user could replace the heaps: a root owned by another user (root excepted), a root
    others can write without the sticky bit, a job directory that is a symbolic link in a root
    others can write, or a job directory of another user or writable by others."""
    me, root = os.getuid(), os.path.dirname(os.path.abspath(path)) or "/"
    fix = "set HPCCKPT_ROOT or root= to a directory of your own"
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.stat(root)
        link = os.lstat(root)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
            raise HeapError(f"{root}: the heap root is a symbolic link of uid {link.st_uid}; {fix}")
        if st.st_uid not in (me, 0):
            raise HeapError(f"{root}: the heap root belongs to uid {st.st_uid}, not to you; {fix}")
        shared = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
        if shared and not st.st_mode & stat.S_ISVTX:
            raise HeapError(f"{root}: the heap root is writable by other users (mode {stat.S_IMODE(st.st_mode):o}) "
                            f"and not sticky, so they could replace your heaps; chmod go-w it, or {fix}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        link = os.lstat(path)
        if stat.S_ISLNK(link.st_mode) and (shared or link.st_uid != me):
            raise HeapError(f"{path}: the job directory is a symbolic link in a shared root; refusing to follow it")
        st = os.stat(path)
    except PermissionError as e:
        raise PermissionError(e.errno, f"{e.filename}: permission denied; {fix}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise HeapError(f"{path}: exists and is not a directory; remove it or choose another job name")
    if st.st_uid != me:
        raise OwnerMismatchError(f"{path}: directory belongs to uid {st.st_uid}, not to you; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HeapError(f"{path}: the job directory is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                        f"chmod 700 it")


class Participant(Protocol):
    """Something that takes part in every coordinated checkpoint (the background export)."""

    def before_prepare(self, heap: Heap, epoch: int) -> None: ...
    def vote(self) -> float: ...
    def after_commit(self, heap: Heap, votes: np.ndarray) -> None: ...


def check_tiling(comm, heap: Heap) -> str | None:
    """Every distributed object's blocks, over all ranks, tile its global shape exactly once.

    Returns the problem (the same text on every rank) or None.
    """
    mine = {}
    for name, lay in heap._layouts.items():
        d = heap.describe(name)
        mine[name] = (lay, d["dtype"], block_shape(d))
    tables = deadline.allgather(comm, mine, "the check that distributed objects tile their global shapes")
    names = sorted({n for t in tables for n in t})
    for name in names:
        holders = [(r, t[name]) for r, t in enumerate(tables) if name in t]
        lay0, dt0, _ = holders[0][1]
        for r, (lay, dt, _) in holders:
            if lay["global_shape"] != lay0["global_shape"] or dt != dt0 or lay["replicated"] != lay0["replicated"]:
                return (f"distributed object {name!r}: rank {holders[0][0]} declares global shape "
                        f"{lay0['global_shape']} of {dt0}{' (replicated)' * lay0['replicated']}, rank {r} "
                        f"{lay['global_shape']} of {dt}{' (replicated)' * lay['replicated']}")
        if lay0["replicated"]:
            if len(holders) != len(tables):
                missing = sorted(set(range(len(tables))) - {r for r, _ in holders})
                return f"replicated object {name!r} is missing on rank(s) {missing}"
            continue
        boxes = [(r, lay["offset"], block) for r, (lay, _, block) in holders]
        problem = _tiles(name, lay0["global_shape"], boxes)
        if problem:
            return problem
    return None


def _tiles(name: str, gshape: list[int], boxes: list[tuple[int, list[int], list[int]]]) -> str | None:
    """Do the boxes (rank, offset, shape) cover gshape exactly once?"""
    for i, (ra, oa, sa) in enumerate(boxes):
        for rb, ob, sb in boxes[i + 1:]:
            if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(oa, sa, ob, sb)):
                return (f"distributed object {name!r}: the blocks of rank {ra} (offset {oa}, shape {sa}) and "
                        f"rank {rb} (offset {ob}, shape {sb}) overlap")
    covered = sum(int(np.prod(s)) for _, _, s in boxes)
    total = int(np.prod(gshape))
    if covered != total:
        ranks = [r for r, _, _ in boxes]
        return (f"distributed object {name!r}: the blocks of rank(s) {ranks} cover {covered} of the "
                f"{total} elements of global shape {gshape}; some part has no rank (a hole)")
    return None


def coordinated_checkpoint(heap: Heap, comm, blob: bytes, participants: list[Participant] = (),
                           layout_changed: bool = False, partner=None) -> int:
    """Prepare locally, agree in one fixed-size reduction, then commit or withdraw everywhere.

    The vote is one Allreduce of a few doubles: by maximum, failed, highest and lowest epoch,
    layout changed, each participant's highest and lowest vote and the stats' maxima; by sum,
    the stats.  O(log N) time and the same bytes per rank at any N.  Error messages are gathered
    only when some rank failed.  When any rank declared new distributed objects, the blocks
    are checked to tile their global shapes before the epoch commits.  With a `partner` level
    (:class:`hpcckpt.partner.PartnerLevel`), every rank hands its partner its delta and
    prepares the epoch in the mirrors it keeps before the vote, which then covers both copies.
    """
    native = heap._native
    epoch, err, local, prepared, interrupted = 0, None, {}, False, None
    try:
        for p in participants:
            p.before_prepare(heap, heap._info()["committed"] + 1)
        if partner is not None:   # the partner takes what this prepare copies: packed on the way
            native.keep_delta(partner.synced)
        epoch = watch(f"checkpoint {os.path.basename(heap.path)}", lambda: _call(native.prepare, blob),
                      native.progress)
        prepared = True
        local = heap._local_stats()
    except Exception as e:   # anything (KeyboardInterrupt included below) casts a "failed" vote
        err = error_text(e)
    except BaseException as e:
        err = error_text(e)
        interrupted = e
    if partner is not None:   # every rank takes part, also one whose prepare failed
        try:
            perr = partner.exchange(heap, epoch, prepared, blob)
        except Exception as e:
            perr = error_text(e)
        err = err or perr
    flags = [p.vote() for p in participants]
    numbers = [float(local.get(k, 0)) for k in _NUMERIC]
    # the vote: one reduction, maxima (minima travel negated) then the sums of the stats
    what = f"the vote of checkpoint {epoch or '?'} (heap.checkpoint)"
    high, sums = reduce_max_sum(comm, [err is not None, epoch, -epoch, layout_changed, *flags,
                                       *(-f for f in flags), *numbers], numbers, what)
    hook = crash_hook(comm.Get_rank())
    if hook and hook[0] == "after-allreduce" and hook[1] in (0, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
    k = len(participants)
    any_failed, top, bottom, layout_any = bool(high[0]), int(high[1]), int(-high[2]), bool(high[3])
    tiling = None
    if not any_failed and top == bottom and layout_any:
        tiling = check_tiling(comm, heap)
    if any_failed or top != bottom or tiling:
        withdraw_err = None
        if prepared:
            try:
                _call(native.withdraw)
            except (OSError, HeapError) as e:
                withdraw_err = f"withdrawing it failed too: {error_text(e)}"
        if partner is not None:
            partner.finish(False)
        said = deadline.allgather(comm, err, what) if any_failed else []   # every rank, or none
        failed = [r for r, e in enumerate(said) if e]
        if any_failed:
            message = next(e for e in said if e)
        elif tiling:
            message = tiling
        else:
            message = f"ranks prepared different epochs (from {bottom} to {top}); the heaps are out of step"
        if withdraw_err:
            message += f" (on rank {comm.Get_rank()}: {withdraw_err})"
        ranks = ", ".join(map(str, failed)) or "all"
        if interrupted is not None:
            raise interrupted
        raise CheckpointError(f"checkpoint {epoch or '?'} failed on rank(s) {ranks}: {message}; "
                              "the epoch was withdrawn on every rank, the previous one stays committed")
    _call(native.commit)
    if partner is not None:
        partner.finish(True)
        local["partner"] = dict(partner.figures)
    local["total"] = {n: (v if n in _TIMES else int(v)) for n, v in zip(_NUMERIC, sums.tolist())}
    local["max"] = {n: (v if n in _TIMES else int(v)) for n, v in zip(_NUMERIC, high[4 + 2 * k:].tolist())}
    heap._stats = local
    for i, p in enumerate(participants):   # a participant sees every rank's vote only when one is 2 (failed)
        low, most = -high[4 + k + i], high[4 + i]
        p.after_commit(heap, np.array(deadline.allgather(comm, flags[i], what)) if most == 2 else np.array([low]))
    return epoch


__all__ = ["default_root", "agree", "private_dir", "coordinated_checkpoint", "check_tiling", "error_text"]
