"""MPI coordination: a collective open that agrees on the restart epoch, and
coordinated checkpoints (every rank prepares, one allgather decides).

>>> from mpi4py import MPI                                   # doctest: +SKIP
>>> heap = hpcckpt.open("stencil", comm=MPI.COMM_WORLD)       # doctest: +SKIP
>>> start = heap.meta.get("step", 0) if heap.restored else 0  # doctest: +SKIP
"""
from __future__ import annotations

import getpass
import os
import signal
from typing import Any

import numpy as np

from .errors import CheckpointError, HeapError
from .heap import Heap, crash_hook, _call

_NUMERIC = ("objects_dirty", "units_dirty", "bytes_dirty", "bytes_copied", "bytes_meta", "bytes_page_baseline",
            "pages_dirty", "views_degraded", "faults", "t_scan", "t_copy", "t_flush", "t_commit", "t_nvm_delay")


def default_root() -> str:
    """Where heaps live: $HPCCKPT_ROOT, else /dev/shm/hpcckpt-$USER (node-local tmpfs)."""
    return os.environ.get("HPCCKPT_ROOT") or f"/dev/shm/hpcckpt-{getpass.getuser()}"


def _agree(comm, ok_or_error: str | None) -> None:
    """Raise the same error on every rank if any rank reported one."""
    errors = comm.allgather(ok_or_error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise HeapError(f"on rank(s) {ranks}: {failed[0][1]}")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise HeapError(f"{path}: directory belongs to uid {st.st_uid}, not to you; set HPCCKPT_ROOT or root=")


def open(name: str, comm: Any = None, root: str | None = None, capacity: int | str = "1GiB",
         tracker: str = "auto", max_objects: int | None = None, preallocate: bool = False) -> Heap:
    """Open or create this rank's heap `<root>/<name>/rank<r>.heap`, collectively.

    The ranks agree on the restart epoch E = min over ranks of the prepared
    epoch; if any rank crashed (or they differ) every rank restores E, and
    ``heap.restored``, ``heap.epoch`` and ``heap.meta`` say where to resume.
    """
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    directory = os.path.join(root or default_root(), name)
    path = os.path.join(directory, f"rank{rank}.heap")
    err = None
    try:
        _private_dir(directory)
    except (OSError, HeapError) as e:
        err = str(e)
    _agree(comm, err)
    present = comm.allgather(os.path.exists(path))
    if any(present) and not all(present):
        missing = [r for r, p in enumerate(present) if not p]
        raise HeapError(f"{directory}: rank(s) {missing} have no heap while the others do; the job cannot "
                        f"restart from local heaps (nothing was overwritten). Remove {directory} to start afresh.")
    heap, err = None, None
    try:
        if present[rank]:
            heap = Heap._attach(path, tracker, name, rank, size)
        else:
            heap = Heap.create(path, capacity, tracker=tracker, max_objects=max_objects, job=name, rank=rank,
                               world_size=size, preallocate=preallocate)
    except (OSError, HeapError, ValueError) as e:
        err = f"{type(e).__name__}: {e}"
    try:
        _agree(comm, err)
        if present[rank]:
            _restore_common_epoch(heap, comm)
    except BaseException:
        if heap is not None:
            heap._native.abandon()
        raise
    heap._comm = comm
    return heap


def _restore_common_epoch(heap: Heap, comm) -> None:
    info = heap._info()
    states = comm.allgather((info["prepared"], info["was_clean"]))
    epoch = min(p for p, _ in states)
    if all(clean for _, clean in states) and all(p == epoch for p, _ in states):
        return   # every rank closed cleanly at the same epoch: keep the working state
    err = None
    try:
        heap._recover(epoch)
    except (OSError, HeapError) as e:
        err = f"{type(e).__name__}: {e}"
    _agree(comm, err)


def coordinated_checkpoint(heap: Heap, blob: bytes) -> int:
    """Prepare locally, agree in one allgather, then commit everywhere or withdraw everywhere.

    The vote travels as a small array of doubles (failed, epoch, stats) so agreeing costs one
    buffer collective; error messages are exchanged only when some rank failed.
    """
    comm, native = heap._comm, heap._native
    epoch, err, local, prepared = 0, None, {}, False
    try:
        epoch = _call(native.prepare, blob)
        prepared = True
        local = heap._local_stats()
    except (OSError, HeapError) as e:
        err = f"{type(e).__name__}: {e}"
    row = np.array([err is not None, epoch, *(float(local.get(k, 0)) for k in _NUMERIC)])
    table = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, table)
    hook = crash_hook(comm.Get_rank())
    if hook and hook[0] == "after-allreduce" and hook[1] in (0, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
    failed = np.flatnonzero(table[:, 0])
    epochs = set(table[table[:, 0] == 0, 1].astype(int).tolist())
    if failed.size or len(epochs) > 1:
        withdraw_err = None
        if prepared:
            try:
                _call(native.withdraw)
            except (OSError, HeapError) as e:
                withdraw_err = f"withdrawing it failed too: {type(e).__name__}: {e}"
        messages = comm.allgather(err or withdraw_err) if failed.size else []   # every rank, or none
        if failed.size:
            message = next(m for m in messages if m)
        else:
            message = f"ranks prepared different epochs {sorted(epochs)}; the heaps are out of step"
        if withdraw_err:
            message += f" (on rank {comm.Get_rank()}: {withdraw_err})"
        ranks = ", ".join(map(str, failed.tolist())) or "all"
        raise CheckpointError(f"checkpoint {epoch or '?'} failed on rank(s) {ranks}: {message}; "
                              "the epoch was withdrawn on every rank, the previous one stays committed")
    _call(native.commit)
    stats = table[:, 2:]
    local["total"] = dict(zip(_NUMERIC, stats.sum(axis=0).tolist()))
    local["max"] = dict(zip(_NUMERIC, stats.max(axis=0).tolist()))
    heap._stats = local
    return epoch


__all__ = ["open", "default_root", "coordinated_checkpoint"]
