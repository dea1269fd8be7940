"""Routing a distributed table's rows to the ranks that own them, after a restore from an export.

A restore gives each rank an even split of the global table in global order (at the same rank
count: its own rows).  When the program declares the table with ``route=f``, every rank calls
``f(rows)`` on its own rows, the answers are checked on every rank first (an integer rank from
0 to size-1 for each row), and then one ``Alltoallv`` sends each row to its rank: no rank ever
holds more than its own rows and the rows it receives.  A rank receives from ranks in rank order
and each sender keeps its rows' order, so every rank's rows stay in global order.  When no row
changes rank (a restart at the same count, or domains that nest, as 4 -> 2 slabs do), nothing
is sent.

Nothing changes unless every rank's route answered well and every rank has room for what it
receives: otherwise every rank raises the same error, naming the table, and the tables are as
they were.  Until the next checkpoint commits, a crash restores the split from the export and
the next declaration routes again.

>>> t = heap.table("particles", dt, distributed=True, route=lambda rows: owner_of(rows["x"]))  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import deadline
from .errors import HeapError


def route_rows(heap: Any, table: Any) -> None:
    """Collective: send every row of `table` to the rank its route names, then clear the flag
    that asked for it.  Without a route the rows stay where the restore put them."""
    from .table import F_ROUTE, TableError
    comm = getattr(heap, "comm", None)
    size = comm.Get_size() if comm is not None else 1
    with heap._lock:
        rows = table.rows
        if table.route is None:
            table._set_flags(table.flags & ~F_ROUTE)
            return
        dest, err = None, None
        try:
            dest = _destinations(table, rows, size)
        except TableError as e:
            err = str(e)
        _agree(comm, err, TableError)
        counts = np.bincount(dest, minlength=size).astype(np.int64) if dest.size else np.zeros(size, np.int64)
        incoming = np.empty(size, np.int64)
        if comm is None:
            incoming[:] = counts
        else:
            deadline.wait(comm.Ialltoall(counts, incoming), f"the exchange of table {table.name!r}'s row counts")
        need = int(incoming.sum())
        me = comm.Get_rank() if comm is not None else 0
        if not _anyone(comm, not (counts[me] == len(rows) == need)):   # every row stays where it is
            table._set_flags(table.flags & ~F_ROUTE)
            return
        err = None
        try:
            table.reserve(need)
        except HeapError as e:
            err = str(e)
        _agree(comm, err, HeapError)
        order = np.argsort(dest.astype(np.uint16) if size <= 1 << 16 else dest, kind="stable")   # radix sort
        send = rows[order]   # a copy: the rows may be received over the table
        direct = heap.kernel_writable   # MPI may write into heap memory (not under mprotect)
        got = table._view(0, need) if direct else np.empty(need, table.dtype)
        if comm is None:
            got[...] = send
        else:
            _alltoallv(comm, send, counts, got, incoming, table.dtype.itemsize)
        if not direct:
            table._view(0, need)[...] = got
        table._set_len(need)
        table._set_flags(table.flags & ~F_ROUTE)


def _destinations(table: Any, rows: np.ndarray, size: int) -> np.ndarray:
    """The route's answer for `rows`, checked: one integer rank in [0, size) per row."""
    from .table import TableError
    try:
        dest = np.asarray(table.route(rows))
    except Exception as e:   # the program's function: report it on every rank, change nothing
        raise TableError(f"table {table.name!r}: route raised {type(e).__name__}: {e}; the table is unchanged")
    if dest.shape != (len(rows),):
        raise TableError(f"table {table.name!r}: route returned {dest.shape[0] if dest.ndim else 'a scalar'} "
                         f"ranks of shape {dest.shape} for {len(rows)} rows; it must return one rank per row; the "
                         "table is unchanged")
    if dest.size and dest.dtype.kind not in "iu":
        raise TableError(f"table {table.name!r}: route returned {dest.dtype} values; ranks are integers; the table "
                         "is unchanged")
    dest = dest.astype(np.int64)
    if dest.size and (dest.min() < 0 or dest.max() >= size):
        bad = int(dest[(dest < 0) | (dest >= size)][0])
        raise TableError(f"table {table.name!r}: route returned rank {bad}, outside 0..{size - 1} (the job runs on "
                         f"{size} ranks); the table is unchanged")
    return dest


def _anyone(comm: Any, flag: bool) -> bool:
    """True on every rank if `flag` is true on any (one reduction)."""
    if comm is None:
        return flag
    from .mpi import any_rank
    return any_rank(comm, flag, "the routing of a table's rows")


def _agree(comm: Any, err: str | None, cls: type) -> None:
    """Every rank raises if any rank failed (one reduction; texts only then)."""
    if comm is None:
        if err:
            raise cls(err)
        return
    from .mpi import agree
    agree(comm, err, cls, "the routing of a table's rows")


def _alltoallv(comm: Any, send: np.ndarray, counts: np.ndarray, recv: np.ndarray, incoming: np.ndarray,
               itemsize: int) -> None:
    """One personalised exchange of rows (counted in rows of `itemsize` bytes)."""
    from mpi4py import MPI
    row = MPI.BYTE.Create_contiguous(itemsize).Commit()
    try:
        sd = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        rd = np.concatenate([[0], np.cumsum(incoming)[:-1]]).astype(np.int64)
        sbuf = send.view(np.uint8).reshape(-1) if send.size else np.empty(0, np.uint8)
        rbuf = recv.view(np.uint8).reshape(-1) if recv.size else np.empty(0, np.uint8)
        # every rank is here (the deadline covers the arrival); the rows then move at MPI's full
        # speed: a nonblocking Alltoallv moves only inside tests, and 64 MB took 4.6 s, not 0.1 s
        deadline.arrive(comm, "the exchange of table rows")
        comm.Alltoallv([sbuf, (counts.tolist(), sd.tolist()), row], [rbuf, (incoming.tolist(), rd.tolist()), row])
    finally:
        row.Free()


__all__ = ["route_rows"]
