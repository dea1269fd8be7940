"""Tables: per-rank sequences of records whose length changes (particles, events, AMR blocks).

A table is one heap object laid out as whole pages of 64-byte units: a 64-byte header
(magic, length, row size, flags, capacity) and then the rows, contiguous, so ``t.rows`` is a
plain numpy view of the live rows.  Every tracker finds the units that changed (a written page's
units are compared with their committed copies), so a checkpoint copies the rows appended or
written and the header unit holding the length, nothing else.  The length commits with the
rows in the same epoch: a kill at any instant restores both as committed.

Capacity grows geometrically (at least doubling) into a new object, so appends cost O(1)
amortised; the old object is freed in the same epoch (README "Decisions").

>>> import hpcckpt, tempfile, os
>>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "t.heap"), "16MiB")
>>> t = heap.table("p", [("x", "f8"), ("v", "f8")])
>>> t.append([(0.5, 1.0), (1.5, -1.0), (2.5, 0.0)])
>>> t.remove([0]); len(t), t.rows["x"].tolist()
(2, [2.5, 1.5])
>>> t.keep(t.rows["v"] < 0.5); t.rows["x"].tolist()
[2.5, 1.5]
>>> epoch = heap.checkpoint(step=1)
>>> heap.close()
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import HeapError, HeapFullError

KIND_TABLE = 3
UNIT = 64              # a table's checkpoint unit (bytes)
PAGE_UNITS = 4096 // UNIT
HEADER = UNIT          # the header takes the first unit
MAGIC = 0x31454C4241544B48   # "HKTABLE1"
F_DISTRIBUTED, F_ROUTE = 1, 2   # flags: one global table over the ranks; restored from an export, not yet routed
_H_MAGIC, _H_LEN, _H_ITEM, _H_FLAGS, _H_CAP = range(5)


class TableError(HeapError, ValueError):
    """A table call that cannot be done as asked; the table is as it was."""


def units_for(rows: int, itemsize: int) -> int:
    """64-byte units (whole pages of them) of a table holding `rows` rows.

    >>> units_for(0, 8), units_for(63, 64), units_for(64, 64)
    (64, 64, 128)
    """
    need = -(-(HEADER + rows * itemsize) // UNIT)
    return max(PAGE_UNITS, -(-need // PAGE_UNITS) * PAGE_UNITS)


def capacity_of(units: int, itemsize: int) -> int:
    """Rows that `units` units hold after the header."""
    return (units * UNIT - HEADER) // itemsize


class Table:
    """One table of a heap: ``len(t)``, ``t.rows`` (a numpy view of the live rows, valid until the
    length next changes), ``append``, ``remove``, ``keep``, ``resize``; ``t[i]``, ``t[i] = v``,
    ``np.asarray(t)`` and iteration as on ``t.rows``.  Declare with :meth:`hpcckpt.Heap.table`.

    >>> import hpcckpt, tempfile, os
    >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "e.heap"), "8MiB")
    >>> t = heap.table("ids", "i8")
    >>> t.extend(range(5)); t[1] = 10; t.resize(3)
    >>> t.rows.tolist(), t.capacity >= 3
    ([0, 10, 2], True)
    >>> heap.close()
    """

    def __init__(self, heap: Any, name: str, dtype: np.dtype, route: Callable | None = None):
        self._heap, self.name, self.dtype, self.route = heap, name, dtype, route
        self._key: tuple | None = None

    # -- the object and its header ----------------------------------------------------------
    def _index(self) -> int:
        index = self._heap._names.get(self.name)
        if index is None:
            raise KeyError(f"{self._heap.path}: table {self.name!r} was deleted")
        return index

    def _bind(self) -> tuple[np.ndarray, int, int]:
        """(header words, byte offset of row 0 in the heap's buffer, capacity in rows)."""
        index = self._index()
        key = (index, self._heap._gen)
        if self._key != key:
            from .heap import _call
            units = _call(self._heap._native.lookup, index)[4]
            base = _call(self._heap._native.offset, index, 0)
            self._hdr = np.ndarray((8,), "<u8", buffer=self._heap._native, offset=base)
            self._base, self._cap, self._key = base + HEADER, capacity_of(units, self.dtype.itemsize), key
            if int(self._hdr[_H_MAGIC]) != MAGIC or int(self._hdr[_H_ITEM]) != self.dtype.itemsize:
                raise HeapError(f"{self._heap.path}: table {self.name!r} has a damaged header")
        return self._hdr, self._base, self._cap

    def _view(self, lo: int, hi: int) -> np.ndarray:
        _, base, _ = self._bind()
        return np.ndarray((hi - lo,), self.dtype, buffer=self._heap._native, offset=base + lo * self.dtype.itemsize)

    @property
    def flags(self) -> int:
        return int(self._bind()[0][_H_FLAGS])

    @property
    def distributed(self) -> bool:
        """True for one global table spread over the ranks (exported as one dataset)."""
        return bool(self.flags & F_DISTRIBUTED)

    def _set_flags(self, flags: int) -> None:
        hdr = self._bind()[0]
        if int(hdr[_H_FLAGS]) != flags:
            hdr[_H_FLAGS] = flags

    def __len__(self) -> int:
        return int(self._bind()[0][_H_LEN])

    @property
    def shape(self) -> tuple[int, ...]:
        """``t.rows.shape``: (rows,) and a sub-array dtype's axes."""
        return (len(self), *self.dtype.shape)

    @property
    def size(self) -> int:
        return len(self)

    @property
    def capacity(self) -> int:
        """Rows the table holds before it grows (into a new object of at least twice as many)."""
        return self._bind()[2]

    @property
    def rows(self) -> np.ndarray:
        """A numpy view of the live rows (no copy), valid until the length next changes."""
        return self._view(0, len(self))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self.rows
        return rows if dtype is None else rows.astype(dtype)

    def __getitem__(self, i: Any) -> Any:
        return self.rows[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        self.rows[i] = value

    def __iter__(self):
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"<hpcckpt.Table {self.name!r}: {len(self)} x {self.dtype} (capacity {self.capacity})>"

    # -- changes of length -------------------------------------------------------------------
    def _records(self, values: Any) -> np.ndarray:
        base, sub = self.dtype.subdtype or (self.dtype, ())
        try:
            vals = np.asarray(values, base)
        except (TypeError, ValueError) as e:
            raise TableError(f"table {self.name!r}: cannot convert the values to {self.dtype} ({e}); "
                             "the table is unchanged") from None
        if vals.shape == tuple(sub):
            vals = vals.reshape(1, *sub)
        if vals.ndim != 1 + len(sub) or vals.shape[1:] != tuple(sub):
            raise TableError(f"table {self.name!r}: values of shape {vals.shape} are not rows of {self.dtype}; "
                             "the table is unchanged")
        return vals

    def _set_len(self, n: int) -> None:
        hdr = self._bind()[0]
        if int(hdr[_H_LEN]) != n:
            hdr[_H_LEN] = n

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows (growing geometrically); the rows stay as they are."""
        with self._heap._lock:
            if rows > self.capacity:
                self._grow(max(rows, 2 * self.capacity))

    def _grow(self, rows: int) -> None:
        """Move the table into a new object of `rows` rows' capacity; free the old one."""
        from .heap import _call, _dtype_str
        heap, old = self._heap, self._index()
        hdr, _, cap = self._bind()
        n, item = int(hdr[_H_LEN]), self.dtype.itemsize
        units = units_for(rows, item)
        try:
            new = _call(heap._native.alloc, self.name, _dtype_str(self.dtype), (capacity_of(units, item),), UNIT,
                        units, KIND_TABLE)
        except HeapFullError as e:
            raise HeapFullError(f"{heap.path}: table {self.name!r} cannot grow from {cap} to {rows} rows "
                                f"({rows * item} bytes): {e}; the table is unchanged ({n} rows). Create the heap "
                                "with a larger capacity") from None
        src = np.ndarray((HEADER + n * item,), np.uint8, buffer=heap._native,
                         offset=_call(heap._native.offset, old, 0))
        dst = np.ndarray((HEADER + n * item,), np.uint8, buffer=heap._native,
                         offset=_call(heap._native.offset, new, 0))
        dst[:] = src
        _call(heap._native.free, old)
        heap._names[self.name] = new
        heap._gen += 1
        self._bind()[0][_H_CAP] = capacity_of(units, item)

    def append(self, values: Any) -> None:
        """Add rows at the end (one record, or a sequence or array of them).

        Growth past the heap's capacity raises HeapFullError naming the table; nothing is appended.
        """
        vals = self._records(values)
        with self._heap._lock:
            n = len(self)
            if n + len(vals) > self.capacity:
                self._grow(max(n + len(vals), 2 * self.capacity))
            self._view(n, n + len(vals))[...] = vals
            self._set_len(n + len(vals))

    extend = append

    def _positions(self, indices: Any) -> np.ndarray:
        n = len(self)
        raw = np.asarray(indices)
        if raw.dtype == bool:
            if raw.shape != (n,):
                raise TableError(f"table {self.name!r}: a mask must have one entry per row ({n}), got {raw.shape}; "
                                 "the table is unchanged")
            return np.flatnonzero(raw)
        if raw.size and raw.dtype.kind not in "iu":
            raise TableError(f"table {self.name!r}: indices must be integers or a boolean mask, got {raw.dtype}")
        idx = raw.astype(np.int64).ravel()
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise TableError(f"table {self.name!r} has {n} rows; an index is out of range; the table is unchanged")
        return idx

    def remove(self, indices: Any) -> None:
        """Remove the rows at `indices` (or where a mask is True); the last rows fill the holes,
        so the order is not kept and the cost is O(removed).

        >>> import hpcckpt, tempfile, os
        >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "r.heap"), "8MiB")
        >>> t = heap.table("t", "i4"); t.append(np.arange(6))
        >>> t.remove([1, 5]); t.rows.tolist()
        [0, 4, 2, 3]
        >>> heap.close()
        """
        idx = np.unique(self._positions(indices))
        with self._heap._lock:
            n = len(self)
            keep_len = n - idx.size
            holes = idx[idx < keep_len]
            tail = np.arange(keep_len, n)
            movers = tail[~np.isin(tail, idx, assume_unique=True)] if holes.size else tail[:0]
            rows = self._view(0, n)
            if holes.size:
                rows[holes] = rows[movers]
            self._set_len(keep_len)

    def keep(self, index_or_mask: Any) -> None:
        """Keep only the rows at the indices given (in that order) or where the mask is True (in
        their order); the others are dropped.

        >>> import hpcckpt, tempfile, os
        >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "k.heap"), "8MiB")
        >>> t = heap.table("t", "i4"); t.append(np.arange(6))
        >>> t.keep(t.rows % 2 == 0); t.rows.tolist()
        [0, 2, 4]
        >>> heap.close()
        """
        idx = self._positions(index_or_mask)
        with self._heap._lock:
            rows = self._view(0, len(self))
            kept = rows[idx]
            same = idx == np.arange(idx.size)
            first = idx.size if same.all() else int(np.argmin(same))
            rows[first:idx.size] = kept[first:]   # rows already in place are not written
            self._set_len(idx.size)

    def resize(self, n: int) -> None:
        """Set the length to `n`: dropped rows go, new rows are zero."""
        n = int(n)
        if n < 0:
            raise TableError(f"table {self.name!r}: a length cannot be negative ({n})")
        with self._heap._lock:
            old = len(self)
            if n > self.capacity:
                self._grow(max(n, 2 * self.capacity))
            if n > old:
                self._view(old, n).view(np.uint8)[...] = 0
            self._set_len(n)

    def clear(self) -> None:
        """Remove every row (the capacity stays)."""
        self.resize(0)


def declare(heap: Any, name: str, dtype: Any, distributed: bool, route: Callable | None,
            capacity: int | None) -> Table:
    """Heap.table: the table the heap holds (checked), or a new empty one."""
    from .heap import _call, _check_name, _dtype_str
    _check_name(name)
    dt = np.dtype(dtype)
    if dt.itemsize == 0 or dt.hasobject:
        raise TableError(f"table {name!r}: rows of {dt} cannot be stored; use a plain numeric, bytes or "
                         "structured dtype of at least one byte")
    if route is not None and not callable(route):
        raise TableError(f"table {name!r}: route must be a function of a block of rows returning their ranks")
    if name in heap._names:
        d = heap.describe(name)
        if d["kind"] != KIND_TABLE:
            raise TableError(f"{heap.path}: {name!r} exists and is not a table; del heap[{name!r}] first")
        if d["dtype"] != _dtype_str(dt):
            raise TableError(f"{heap.path}: table {name!r} holds rows of {_held_dtype(d['dtype'])}; the program "
                             f"declared {dt}; the table is unchanged. Declare it with its dtype, or "
                             f"del heap[{name!r}] first")
        t = Table(heap, name, dt, route)
        if t.distributed != bool(distributed):
            raise TableError(f"{heap.path}: table {name!r} is {'' if t.distributed else 'not '}distributed; the "
                             f"program declared distributed={bool(distributed)}; the table is unchanged")
        if t.flags & F_ROUTE:
            from .route import route_rows
            route_rows(heap, t)
        return t
    rows = max(0, int(capacity or 0))
    units = units_for(rows, dt.itemsize)
    with heap._lock:
        if name in heap._names:
            raise KeyError(f"{heap.path}: an object named {name!r} exists already")
        index = _call(heap._native.alloc, name, _dtype_str(dt), (capacity_of(units, dt.itemsize),), UNIT, units,
                      KIND_TABLE)
        heap._names[name] = index
        t = Table(heap, name, dt, route)
        hdr = np.ndarray((8,), "<u8", buffer=heap._native, offset=_call(heap._native.offset, index, 0))
        hdr[_H_ITEM], hdr[_H_FLAGS] = dt.itemsize, F_DISTRIBUTED if distributed else 0
        hdr[_H_CAP], hdr[_H_MAGIC] = capacity_of(units, dt.itemsize), MAGIC
    return t


def _held_dtype(text: str) -> str:
    from .heap import _dtype_parse
    try:
        return str(_dtype_parse(text))
    except (ValueError, SyntaxError):
        return text


__all__ = ["Table", "TableError", "declare", "units_for", "capacity_of", "KIND_TABLE"]
