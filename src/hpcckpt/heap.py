"""The persistent heap: named numpy objects in a file that survives the process.

>>> import hpcckpt, numpy as np, tempfile, os
>>> d = tempfile.mkdtemp()
>>> with hpcckpt.Heap.create(os.path.join(d, "r0.heap"), capacity="16MiB") as heap:
...     u = heap.array("u", (4, 4), "f8")
...     u[:] = 1.0
...     epoch = heap.checkpoint(step=1)
>>> with hpcckpt.Heap.open(os.path.join(d, "r0.heap")) as heap:
...     float(heap["u"].sum()), heap.meta["step"]
(16.0, 1)
"""
from __future__ import annotations

import ast
import json
import math
import operator
import functools
import errno
import os
import threading
import warnings
from typing import Any, Iterator

import numpy as np

from . import _native
from ._progress import watch
from ._units import parse_size
from .errors import CorruptHeapError, HeapBusyError, HeapError, HeapFullError, RepairWarning, translate
from .table import Table

TRACKERS = {"uffd": _native.TRACK_UFFD, "mprotect": _native.TRACK_MPROTECT, "page": _native.TRACK_PAGE,
            "hash": _native.TRACK_HASH, "full": _native.TRACK_FULL}
_TRACKER_NAMES = {v: k for k, v in TRACKERS.items()}
_KIND_ARRAY, _KIND_POOL, _KIND_TABLE = 1, 2, 3
_CRASH_POINTS = {"before-copy": _native.CRASH_BEFORE_COPY, "mid-copy": _native.CRASH_MID_COPY,
                 "after-copy": _native.CRASH_AFTER_COPY, "after-prepare": _native.CRASH_AFTER_PREPARE,
                 "mid-restore": _native.CRASH_MID_RESTORE}
NAME_MAX = 63
THREADS_MAX = 8   # PAR_MAX of the core
LAYOUT_OBJECT = "/layout"   # hidden object: JSON of the distributed declarations (a user name cannot hold "/")


def resolve_tracker(tracker: str) -> str:
    """The tracker that `tracker` ("auto" or a name) means on this kernel.

    >>> resolve_tracker("hash")
    'hash'
    """
    if tracker == "auto":
        return "uffd" if _native.UFFD_SUPPORTED else "mprotect"
    if tracker not in TRACKERS:
        raise ValueError(f"unknown tracker {tracker!r}: choose one of auto, {', '.join(TRACKERS)}")
    if tracker == "uffd" and not _native.UFFD_SUPPORTED:
        raise HeapError("tracker 'uffd' needs userfaultfd async write-protect (Linux >= 6.7); "
                        "use tracker='auto' or 'mprotect'")
    return tracker


def default_threads(ranks_here: int = 1) -> int:
    """Threads a checkpoint may use: ``$HPCCKPT_THREADS``, else this process's share of the
    CPUs it may run on (all of them when bound to a subset; split among the `ranks_here`
    ranks of the node when free to run anywhere), 1 to 8.

    >>> 1 <= default_threads() <= THREADS_MAX
    True
    """
    env = os.environ.get("HPCCKPT_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if not 1 <= n <= THREADS_MAX:
            raise HeapError(f"HPCCKPT_THREADS={env!r}: give a whole number of threads from 1 to {THREADS_MAX}")
        return n
    mine = len(os.sched_getaffinity(0))
    share = mine // max(1, ranks_here) if mine >= (os.cpu_count() or mine) else mine
    return max(1, min(THREADS_MAX, share))


def crash_hook(rank: int) -> tuple[str, int] | None:
    """The test hook, if it applies to this rank and attempt: (point, epoch or 0).

    HPCCKPT_CRASH_AT="point[@epoch][:rank[,rank...]]" makes the process SIGKILL
    itself at that point; it fires only while HPCCKPT_ATTEMPT (set by
    ``hpcckpt run``, default 1) equals HPCCKPT_CRASH_ATTEMPT (default 1).
    """
    spec = os.environ.get("HPCCKPT_CRASH_AT")
    if not spec or os.environ.get("HPCCKPT_ATTEMPT", "1") != os.environ.get("HPCCKPT_CRASH_ATTEMPT", "1"):
        return None
    spec, _, ranks = spec.partition(":")
    point, _, epoch = spec.partition("@")
    if ranks and rank not in {int(r) for r in ranks.split(",")}:
        return None
    return point, int(epoch or 0)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("an object name must be a non-empty string")
    if "/" in name or "\0" in name:
        raise ValueError(f"object name {name!r} may not contain '/' or NUL")
    if len(name.encode()) > NAME_MAX:
        raise ValueError(f"object name {name[:20]!r}... is {len(name.encode())} bytes; at most {NAME_MAX}")


def check_job(job: str) -> str:
    """A job name becomes a directory name: '' or a plain name (no '/', not '.' or '..', no NUL).

    >>> check_job("../victim")
    Traceback (most recent call last):
    ValueError: job name '../victim' must be a plain name (no '/', not '.' or '..'): it names a directory
    """
    if not isinstance(job, str) or "/" in job or "\0" in job or job in (".", ".."):
        raise ValueError(f"job name {job!r} must be a plain name (no '/', not '.' or '..'): it names a directory")
    return job


def _dtype_str(dtype: np.dtype) -> str:
    if dtype.hasobject:
        raise TypeError(f"dtype {dtype} holds Python objects, which cannot live in a persistent heap; "
                        "use plain numeric, bytes or structured dtypes")
    return repr(_descr(dtype))


def _descr(dtype: np.dtype) -> Any:
    """A literal that describes `dtype` exactly; sub-array dtypes, which numpy's own description
    flattens to void bytes, become {"subarray": (base, shape)}."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"subarray": (_descr(base), tuple(shape))}
    return np.lib.format.dtype_to_descr(dtype)


def _from_descr(d: Any) -> np.dtype:
    if isinstance(d, dict):
        base, shape = d["subarray"]
        return np.dtype((_from_descr(base), tuple(shape)))
    return np.lib.format.descr_to_dtype(d)


def _dtype_parse(text: str) -> np.dtype:
    return _from_descr(ast.literal_eval(text))


def _guard_faulthandler() -> None:
    """faulthandler.enable()/disable() replace the SIGSEGV handler that the mprotect tracker
    needs: put it back in front after each (README "Decisions"); checkpoints do it too."""
    import faulthandler
    if getattr(faulthandler.enable, "_hpcckpt", False):
        return
    enable, disable = faulthandler.enable, faulthandler.disable

    @functools.wraps(enable)
    def enable_then_reassert(*args, **kwargs):
        enable(*args, **kwargs)
        _native.reassert_handler(False)

    @functools.wraps(disable)
    def disable_then_reassert(*args, **kwargs):
        result = disable(*args, **kwargs)
        _native.reassert_handler(True)
        return result
    enable_then_reassert._hpcckpt = disable_then_reassert._hpcckpt = True
    faulthandler.enable, faulthandler.disable = enable_then_reassert, disable_then_reassert


def locked(method):
    """Run a Heap method under the heap's lock: close, checkpoint, allocation and frees never
    interleave across threads (a close waits for a checkpoint in flight)."""
    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return under_lock


class Pool:
    """Many same-dtype objects, each tracked on its own: ``pool[i]`` is object i.

    >>> import hpcckpt, tempfile, os
    >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "p.heap"), capacity="8MiB")
    >>> p = heap.pool("cells", [("x", "f8"), ("n", "i4")], 1000)
    >>> p[7]["x"] = 2.5
    >>> len(p), float(p[7]["x"])
    (1000, 2.5)
    >>> heap.close()
    """

    def __init__(self, heap: Heap, index: int, name: str, dtype: np.dtype, shape: tuple, count: int):
        self._heap, self._index, self.name, self.dtype, self.shape = heap, index, name, dtype, shape
        self._count = count
        self._gen = -1   # heap._gen the slot arrays were made for

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"pool {self.name!r} has {self._count} objects; index {i} is out of range")
        if self._gen != self._heap._gen:
            self._slots = self._heap._pool_slots(self)
            self._gen = self._heap._gen
        if self._slots is None:
            return self._heap._view(self._index, i, self.shape, self.dtype, self.writes == "put")
        k, arrays = self._slots
        return arrays[i % k][i // k, ...]

    @property
    def writes(self) -> str:
        """``"put"`` if the pool is written only through :meth:`put` (see :meth:`Heap.put_only`),
        else ``"any"``."""
        return "put" if self.name in self._heap._put_only else "any"

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self._count))

    def _indices(self, indices: Any) -> np.ndarray:
        raw = np.asarray(indices)
        if raw.size and raw.dtype.kind not in "iu":
            raise TypeError(f"pool {self.name!r}: indices must be integers, got {raw.dtype}")
        if raw.size and raw.dtype.kind == "u" and raw.max() >= self._count:
            raise IndexError(f"pool {self.name!r} has {self._count} objects; index {int(raw.max())} is out of range")
        idx = raw.astype(np.int64).ravel()
        idx = np.where(idx < 0, idx + self._count, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self._count):
            raise IndexError(f"pool {self.name!r} has {self._count} objects; an index is out of range")
        return np.ascontiguousarray(idx, dtype=np.uint64)

    def take(self, indices: Any) -> np.ndarray:
        """Copy the objects at `indices` out into a new array (fast, one call).

        >>> import hpcckpt, tempfile, os
        >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "t.heap"), "4MiB")
        >>> p = heap.pool("p", "i8", 100)
        >>> p.put([3, 5], [30, 50])
        >>> p.take([5, 3]).tolist(), int(p[3])
        ([50, 30], 30)
        >>> heap.close()
        """
        idx = self._indices(indices)
        out = np.empty((idx.size, *self.shape), self.dtype)
        _call(self._heap._native.read, self._index, idx, out)
        return out

    def put(self, indices: Any, values: Any, *, field: str | None = None) -> None:
        """Write `values` into the objects at `indices` (fast, one call); they count as written
        for the next checkpoint without a write fault per object.  With `field`, only that
        field of each record changes: the vector path for updating many objects.

        >>> import hpcckpt, tempfile, os
        >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "f.heap"), "4MiB")
        >>> p = heap.pool("p", [("key", "u8"), ("value", "f8")], 100)
        >>> p.put([4, 8], [(4, 0.0), (8, 0.0)])
        >>> p.put([4, 8], [1.5, 2.5], field="value")
        >>> p.take([4, 8]).tolist()
        [(4, 1.5), (8, 2.5)]
        >>> heap.close()
        """
        idx = self._indices(indices)
        with self._heap._lock:   # its marks must not change under a checkpoint's collection
            if field is not None:
                records = self.take(idx)
                records[field] = values
                values = records
            base, sub = self.dtype.subdtype or (self.dtype, ())   # numpy spreads a sub-array dtype into axes
            data = np.ascontiguousarray(np.broadcast_to(np.asarray(values, base), (idx.size, *self.shape, *sub)))
            _call(self._heap._native.write, self._index, idx, data)

    def __repr__(self) -> str:
        return f"<hpcckpt.Pool {self.name!r}: {self._count} x {self.dtype} {self.shape}>"


class Heap:
    """One rank's persistent heap: a dict of named numpy arrays and pools.

    Create with :meth:`create`, reopen with :meth:`open` (after a crash it is
    restored to the last committed checkpoint), or collectively under MPI with
    :func:`hpcckpt.open`.  ``heap.checkpoint(step=n)`` commits an epoch.
    Arrays that outlive :meth:`close` keep working on a private copy; writes
    to them no longer reach the heap.

    Attributes:

    - ``path``: the heap file.
    - ``tracker``: the tracker in use (``"uffd"``, ``"mprotect"``, ``"page"``, ``"hash"``,
      ``"full"``, or ``"read-only"``), after ``"auto"`` was resolved.
    - ``restored``: True when this open restored a committed epoch (after a crash, a
      rollback, or from an export) rather than finding the heap as it was closed.
    - ``restored_from``: ``"local"``, ``"export"`` or None (nothing restored, or a fresh job).
    """

    def __init__(self, native: Any, path: str, tracker: str, threads: int = 1):
        self._lock = threading.RLock()
        self._native, self.path, self.tracker = native, path, tracker
        self._names: dict[str, int] = {}
        self._layouts: dict[str, dict] = {}
        self._put_only: set[str] = set()   # pools this process writes only through put
        self._gen = 0   # bumped when pools' cached slot arrays may be stale (close, del, restore, put_only)
        self._stats: dict = {}
        self.restored = False
        self.restored_from: str | None = None
        self._reblock = None   # set by the restore layer: re-blocks a distributed object from an export
        self._layout_index: int | None = None
        self._pid = os.getpid()   # a forked child holds a detached copy (see README "Decisions")
        self._repairs = 0
        if tracker == "mprotect" or (tracker == "page" and not _native.UFFD_SUPPORTED):
            _guard_faulthandler()
        info = native.info()
        self._capacity = info["capacity"]   # one view's length: pool slot arrays stay inside one
        self._report_repairs(info)
        self._load_names()
        self.set_threads(threads)
        hook = crash_hook(info["rank"])
        if hook and hook[0] in _CRASH_POINTS:
            native.set_crash(_CRASH_POINTS[hook[0]], hook[1])

    # -- opening and closing -------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, capacity: int | str = "1GiB", *, tracker: str = "auto",
               max_objects: int | None = None, job: str = "", rank: int = 0, world_size: int = 1,
               preallocate: bool = False) -> Heap:
        """Create a new heap file (sparse, mode 0600) holding up to `capacity` bytes of objects.

        `preallocate=True` reserves the whole file now (about 3x capacity: data and two
        checkpoint copies), so a full file system fails here instead of killing the job
        later, and maps the catalog and data in at every open (no page faults while allocating).

        >>> import tempfile, os
        >>> h = Heap.create(os.path.join(tempfile.mkdtemp(), "a.heap"), "4MiB", tracker="hash")
        >>> h.tracker, len(h)
        ('hash', 0)
        >>> h.close()
        """
        path, job = os.fspath(path), check_job(job)
        cap = parse_size(capacity)
        maxe = max_objects if max_objects is not None else max(1024, cap // 1024)
        # built under a temporary name and linked into place whole: a file at `path` that is
        # not a heap is damage (never a create that died half-way), and is never deleted for it
        _check_room(path, cap, preallocate)
        tmp = f"{path}.new{os.getpid()}"
        try:
            _call(_native.create, tmp, cap, maxe, job, rank, world_size, preallocate)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{path}: a file of that name exists; open it, or remove it "
                                  "first if it is not needed") from None
        finally:
            os.unlink(tmp)
        return cls._attach(path, tracker)

    @classmethod
    def open(cls, path: str | os.PathLike, *, tracker: str = "auto", job: str | None = None,
             rank: int | None = None, world_size: int | None = None, readonly: bool = False) -> Heap:
        """Open an existing heap; after a crash it is restored to the last committed epoch.

        `job`, `rank`, `world_size`, when given, must match the heap's owner.
        `readonly=True` inspects the heap as it lies on media: nothing is written,
        nothing restored, arrays are read-only.
        """
        if readonly:
            return cls._attach(os.fspath(path), "read-only", job, rank, world_size)
        heap = cls._attach(os.fspath(path), tracker, job, rank, world_size)
        try:
            info = heap._info()
            good = info["good_epoch"]
            if good < info["prepared"]:
                warnings.warn(f"{heap.path}: rolled back to epoch {good}, the newest that its checks confirm "
                              f"({info['note']})", RepairWarning, stacklevel=2)
                heap._recover(good)
            elif not info["was_clean"]:
                heap._recover(info["prepared"])
        except BaseException:
            heap._native.abandon()
            raise
        return heap

    @classmethod
    def _attach(cls, path: str, tracker: str, job: str | None = None, rank: int | None = None,
                world_size: int | None = None) -> Heap:
        """Open without recovery; a heap of another owner is refused before anything is written."""
        name = tracker if tracker == "read-only" else resolve_tracker(tracker)
        threads = default_threads()   # a bad $HPCCKPT_THREADS is refused before the file is touched
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such heap; create it with hpcckpt.Heap.create()")
        try:
            native = _call(_native.open, path, TRACKERS.get(name, _native.TRACK_NONE), job,
                           -1 if rank is None else rank, -1 if world_size is None else world_size)
        except HeapBusyError as e:   # say who holds it: this very process is a different mistake
            from .locks import holder
            pid = holder(path)
            if pid == os.getpid():
                raise HeapBusyError(f"{path}: heap is already open in this process; use that Heap, or close it "
                                    "first") from None
            raise HeapBusyError(f"{e} (PID {pid})" if pid else str(e)) from None
        return cls(native, path, name, threads)

    def _report_repairs(self, info: dict | None = None) -> None:
        """Warn once for every repair the core made since the last report (open, alloc)."""
        info = info or self._native.info()
        if info["repairs"] > self._repairs:
            warnings.warn(f"{self.path}: repaired {info['repairs'] - self._repairs} damaged item(s): "
                          f"{info['note']}", RepairWarning, stacklevel=3)
            self._repairs = info["repairs"]

    @locked
    def _recover(self, epoch: int) -> None:
        watch(f"restore {os.path.basename(self.path)} epoch {epoch}", lambda: _call(self._native.recover, epoch),
              self._native.progress)
        self.restored = True
        self.restored_from = "local"
        self._put_only.clear()   # the core forgot the promises with the objects they were about
        self._gen += 1
        self._load_names()

    def _load_names(self) -> None:
        """Index the live catalog entries by name; read the distributed declarations."""
        self._names, self._layouts = {}, {}
        hidden = None
        i = self._native.next_live(0)
        while i >= 0:
            name = _call(self._native.lookup, i)[0]
            if name == LAYOUT_OBJECT:
                hidden = i
            else:
                self._names[name] = i
            i = self._native.next_live(i + 1)
        if hidden is not None:
            _, _, shape, _, _, _ = _call(self._native.lookup, hidden)
            raw = self._view(hidden, 0, tuple(shape), np.dtype("u1")).tobytes()
            try:
                layouts = json.loads(raw)
            except ValueError:
                raise CorruptHeapError(f"{self.path}: the record of distributed objects is not valid JSON") from None
            self._layouts = {k: v for k, v in layouts.items() if k in self._names}
        self._layout_index = hidden

    def _save_layouts(self) -> None:
        """Rewrite the hidden record of distributed declarations (checkpointed like any object)."""
        blob = json.dumps(self._layouts, sort_keys=True).encode()
        old = self._layout_index
        if old is not None:
            _, _, shape, _, _, _ = _call(self._native.lookup, old)
            if self._view(old, 0, tuple(shape), np.dtype("u1")).tobytes() == blob:
                return
            _call(self._native.free, old)
            self._layout_index = None
        if not blob or blob == b"{}":
            return
        index = _call(self._native.alloc, LAYOUT_OBJECT, _dtype_str(np.dtype("u1")), (len(blob),), len(blob), 1,
                      _KIND_ARRAY)
        self._view(index, 0, (len(blob),), np.dtype("u1"))[:] = np.frombuffer(blob, np.uint8)
        self._layout_index = index

    @locked
    def close(self) -> None:
        """Make everything durable and mark the heap cleanly closed."""
        self._gen += 1
        _call(self._native.close)

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:   # an exception is not a clean end: the next open restores the last checkpoint
            self._gen += 1
            self._native.abandon()

    # -- objects -------------------------------------------------------------
    def array(self, name: str, shape: int | tuple[int, ...], dtype: Any = "f8", *,
              global_shape: tuple[int, ...] | None = None, offset: tuple[int, ...] | None = None,
              halo: int | tuple[int, ...] | None = None, replicated: bool = False) -> np.ndarray:
        """A new zero-filled array that *is* the persistent object (no copy).

        With `global_shape` and `offset` the array is this rank's block of a distributed array
        (exported as one global dataset, restorable on another number of ranks); `halo` (a width
        per axis) says how many ghost cells surround the block on each side: `shape` includes
        them, the global array does not.  Ghost cells on the global edge are state (often the
        boundary condition, set once): an export keeps them beside the block, and a restore at any
        rank count gives them back; interior ghost cells come back as the neighbouring rows of
        the global array, as a halo exchange would fill them.  `replicated=True` declares an
        array that is the same on every rank.  Declaring a distributed array that exists with the
        same layout returns it.

        >>> import tempfile, os
        >>> h = Heap.create(os.path.join(tempfile.mkdtemp(), "b.heap"), "4MiB")
        >>> a = h.array("a", (2, 3), "i4"); a[1, 2] = 7
        >>> int(h["a"][1, 2])
        7
        >>> u = h.array("u", (6, 4), global_shape=(8, 4), offset=(4, 0), halo=(1, 0))
        >>> h.layout("u")
        ((8, 4), (4, 0))
        >>> h.close()
        """
        _check_name(name)
        shape = tuple(int(s) for s in np.atleast_1d(shape)) if np.ndim(shape) else (int(shape),)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        dt = np.dtype(dtype)
        layout = self._declared(name, lambda: _make_layout(name, shape, global_shape, offset, halo, replicated))
        if layout and name in self._names:
            return self._redeclare(name, dt, shape, 1, _KIND_ARRAY, layout)
        index = self._alloc(name, dt, shape, math.prod(shape) * dt.itemsize, 1, _KIND_ARRAY, layout)
        return self._view(index, 0, shape, dt)

    def pool(self, name: str, dtype: Any, count: int, shape: tuple[int, ...] = (), *,
             global_count: int | None = None, offset: int | None = None, replicated: bool = False,
             writes: str = "any") -> Pool:
        """`count` objects of `dtype` (each of `shape`), each in its own tracked slot.

        With `global_count` and `offset` the pool holds rows offset..offset+count of a table of
        `global_count` rows spread over the ranks (see :meth:`array`).  ``writes="put"`` promises
        that the pool is written only through :meth:`Pool.put` (see :meth:`put_only`).

        >>> import tempfile, os
        >>> h = Heap.create(os.path.join(tempfile.mkdtemp(), "w.heap"), "4MiB")
        >>> t = h.pool("table", [("key", "u8"), ("value", "f8")], 1000, writes="put")
        >>> t.put([3, 9], [(3, 0.5), (9, 1.5)])
        >>> float(t[9]["value"]), t[9].flags.writeable
        (1.5, False)
        >>> h.close()
        """
        if writes not in ("any", "put"):
            raise ValueError(f"writes must be 'any' or 'put', got {writes!r}")
        _check_name(name)
        dt, shape = np.dtype(dtype), tuple(shape)
        if count < 1:
            raise ValueError(f"a pool needs at least one object, got count={count}")
        layout = self._declared(name, lambda: _make_layout(
            name, (int(count),), None if global_count is None else (int(global_count),),
            None if offset is None else (int(offset),), None, replicated))
        if layout and name in self._names:
            pool = self._redeclare(name, dt, shape, int(count), _KIND_POOL, layout)
        else:
            index = self._alloc(name, dt, shape, math.prod(shape) * dt.itemsize, int(count), _KIND_POOL, layout)
            pool = Pool(self, index, name, dt, shape, int(count))
        if writes == "put":
            self.put_only(name)
        return pool

    def table(self, name: str, dtype: Any, *, distributed: bool = False, route: Any = None,
              capacity: int | None = None) -> Table:
        """A table of records whose length changes (see :mod:`hpcckpt.table`): the one the heap
        holds, or a new empty one with room for `capacity` rows (it grows by itself).

        `distributed=True` makes each rank's table part of one global table (exported as one
        dataset, rows in rank order; declaring it is collective).  After a restore from an export
        the rows are split evenly in global order (at the same rank count each rank gets its own
        back); `route`, a function of a block of rows returning each one's rank, sends every row
        to its rank instead, in one exchange, at this declaration.

        >>> import tempfile, os
        >>> h = Heap.create(os.path.join(tempfile.mkdtemp(), "t.heap"), "8MiB")
        >>> t = h.table("events", [("t", "f8"), ("id", "i8")])
        >>> t.append([(0.5, 1), (0.7, 2)]); len(h["events"])
        2
        >>> h.close()
        """
        from .table import declare
        return declare(self, name, dtype, distributed, route, capacity)

    def _declared(self, name: str, make) -> dict | None:
        """The layout `make()` builds; a declaration that cannot fit what the heap holds (as after a
        restore from an export) says what the heap holds and what to do."""
        try:
            return make()
        except ValueError as e:
            held = self._layouts.get(name)
            if held is None or held.get("replicated"):
                raise
            raise ValueError(self._mismatch(name, held, str(e))) from None

    def _mismatch(self, name: str, held: dict, declared: str) -> str:
        where = (f"the export restored here (epoch {self.epoch}) holds" if self.restored_from == "export"
                 else "the heap holds")
        return (f"{self.path}: {where} {name!r} with global shape {list(held['global_shape'])}; the program "
                f"declared {declared}. Declare the global shape that is held (global sizes must not depend on "
                f"the number of ranks: split them with numpy.array_split(range(n), comm.size)), or del "
                f"heap[{name!r}] before declaring it anew")

    def _redeclare(self, name: str, dt: np.dtype, shape: tuple, count: int, kind: int, layout: dict):
        """A distributed object declared again: the same layout returns it, another re-blocks or fails."""
        held = self.describe(name)
        same = (held["dtype"] == _dtype_str(dt) and held["kind"] == kind and held["count"] == count
                and tuple(held["shape"]) == shape)
        if same and held["layout"] == layout:
            return self[name]
        if held["layout"] and list(held["layout"]["global_shape"]) != list(layout["global_shape"]):
            raise KeyError(self._mismatch(name, held["layout"], f"global shape {list(layout['global_shape'])}"))
        if self._reblock is not None and held["layout"] and held["dtype"] == _dtype_str(dt):
            return self._reblock(name, dt, shape, count, kind, layout)
        raise KeyError(f"{self.path}: {name!r} exists as "
                       f"{_declared_as(held['kind'], held['dtype'], held['shape'], held['count'], held['layout'])} at "
                       f"offset {(held['layout'] or {}).get('offset')}; the program declared "
                       f"{_declared_as(kind, _dtype_str(dt), shape, count, layout)} at offset {layout.get('offset')}. "
                       f"Use heap[{name!r}] or del heap[{name!r}] first")

    def layout(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(global_shape, offset) of a distributed object; None for a rank-private one."""
        if name not in self._names:
            raise KeyError(f"{self.path}: no object named {name!r}")
        lay = self._layouts.get(name)
        return None if lay is None else (tuple(lay["global_shape"]), tuple(lay["offset"]))

    def describe(self, name: str) -> dict:
        """What the heap knows of one object: catalog index, kind, dtype, shape, count, layout."""
        index = self._names.get(name)
        if index is None:
            raise KeyError(f"{self.path}: no object named {name!r}")
        _, dtype, shape, obj_size, count, kind = _call(self._native.lookup, index)
        return {"name": name, "index": index, "kind": kind, "dtype": dtype, "shape": list(shape),
                "obj_size": obj_size, "count": count, "layout": self._layouts.get(name)}

    @locked
    def _alloc(self, name: str, dt: np.dtype, shape: tuple, size: int, count: int, kind: int,
               layout: dict | None = None) -> int:
        if name in self._names:   # the same declaration returns it, so the same lines start and resume a job
            held = self.describe(name)
            if not layout and not held["layout"] and (held["kind"], held["dtype"], tuple(held["shape"]),
                                                       held["count"]) == (kind, _dtype_str(dt), shape, count):
                return held["index"]
            was = _declared_as(held["kind"], held["dtype"], held["shape"], held["count"], held["layout"])
            now = _declared_as(kind, _dtype_str(dt), shape, count, layout)
            raise KeyError(f"{self.path}: {name!r} exists as {was}; the program declared {now}. "
                           f"Use heap[{name!r}], del heap[{name!r}] first, or another name")
        if size * count >= 2**63:
            raise HeapFullError(f"{self.path}: {name!r} needs more than the heap's whole capacity "
                                f"({count} objects of {size} bytes)")
        index = _call(self._native.alloc, name, _dtype_str(dt), shape, size, count, kind)
        self._names[name] = index
        self._report_repairs()
        if layout:
            self._layouts[name] = layout
            try:
                self._save_layouts()
            except BaseException:
                self._layouts.pop(name)
                del self[name]
                raise
        return index

    def _view(self, index: int, obj: int, shape: tuple, dtype: np.dtype, read_only: bool = False) -> np.ndarray:
        view = np.ndarray(shape, dtype, buffer=self._native, offset=_call(self._native.offset, index, obj))
        if read_only:   # a put-only pool's writes must come through put
            view.flags.writeable = False
        return view

    def _pool_slots(self, pool: Pool) -> tuple[int, list[np.ndarray]] | None:
        """Strided arrays over a pool's objects, one per slot of a page (object i is row i // k
        of array i % k), read from where the core placed objects 0..k and checked at the last;
        None when the placement is not that regular."""
        off = functools.partial(_call, self._native.offset, pool._index)
        n, base, page = pool._count, off(0), 4096
        k, stride = n, page
        for j in range(1, min(n, 65)):   # the first object on the next page, in the same view
            delta = off(j) - base
            if 0 < delta < self._capacity and delta % page == 0:
                k, stride = j, delta
                break
        firsts = [base] + [off(s) for s in range(1, k)]
        if off(n - 1) != firsts[(n - 1) % k] + (n - 1) // k * stride:
            return None
        base, sub = pool.dtype.subdtype or (pool.dtype, ())   # numpy spreads a sub-array dtype into axes
        shape = (*pool.shape, *sub)
        inner = np.empty(shape, base).strides
        arrays = []
        for s, first in enumerate(firsts):
            rows = (n - s + k - 1) // k
            a = np.ndarray((rows, *shape), base, buffer=self._native, offset=first, strides=(stride, *inner))
            if pool.writes == "put":
                a.flags.writeable = False
            arrays.append(a)
        return k, arrays

    def __getitem__(self, name: str) -> np.ndarray | Pool | Table:
        index = self._names.get(name)
        if index is None:
            raise KeyError(f"{self.path}: no object named {name!r}")
        _, dtype, shape, _, count, kind = _call(self._native.lookup, index)
        dt = _dtype_parse(dtype)
        if kind == _KIND_POOL:
            return Pool(self, index, name, dt, tuple(shape), count)
        if kind == _KIND_TABLE:
            return Table(self, name, dt)
        return self._view(index, 0, tuple(shape), dt)

    @locked
    def __delitem__(self, name: str) -> None:
        index = self._names.get(name)
        if index is None:
            raise KeyError(f"{self.path}: no object named {name!r}")
        _call(self._native.free, index)
        del self._names[name]
        self._put_only.discard(name)
        self._gen += 1
        if self._layouts.pop(name, None) is not None:
            self._save_layouts()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def keys(self) -> list[str]:
        return list(self._names)

    # -- checkpoints ---------------------------------------------------------
    @locked
    def checkpoint(self, **meta: Any) -> int:
        """Commit an epoch holding every object as it is now; returns its number.

        `meta` is small JSON-able data (a step counter, a time) read back as ``heap.meta``.
        Under MPI (:func:`hpcckpt.open`) this is collective.
        """
        blob = json.dumps(meta, sort_keys=True).encode()
        epoch = self._prepare(blob)
        _call(self._native.commit)
        local = self._local_stats()
        numbers = {k: v for k, v in local.items() if isinstance(v, (int, float)) and k != "epoch"}
        self._stats = {**local, "total": dict(numbers), "max": dict(numbers)}   # the same keys as under MPI
        return epoch

    def _prepare(self, blob: bytes) -> int:
        """Copy what changed into the next epoch's copies (progress shown on a terminal past 2 s)."""
        return watch(f"checkpoint {os.path.basename(self.path)}", lambda: _call(self._native.prepare, blob),
                     self._native.progress)

    def _local_stats(self) -> dict:
        s = self._native.stats()
        s["tracker"] = self.tracker
        return s

    @property
    def threads(self) -> int:
        """Threads each checkpoint may copy on (see `set_threads`)."""
        return self._threads

    def set_threads(self, n: int) -> None:
        """Let each checkpoint share its copy among up to `n` threads (1 to 8), each taking
        at least 256 KiB; smaller checkpoints copy on the calling thread.  The threads live for
        one checkpoint only.  The default is ``$HPCCKPT_THREADS``, else this process's CPUs (at
        most 8); ``hpcckpt.open`` gives each rank its share of its node's CPUs.

        >>> import tempfile, os
        >>> h = Heap.create(os.path.join(tempfile.mkdtemp(), "t.heap"), "4MiB")
        >>> h.set_threads(1); h.threads
        1
        >>> h.close()
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= THREADS_MAX:
            raise ValueError(f"threads must be a whole number from 1 to {THREADS_MAX}, got {n!r}")
        self._native.set_threads(n)
        self._threads = n

    def set_nvm_model(self, write_gbps: float = 0.0, flush_latency_ns: float = 0.0) -> None:
        """Slow checkpoint writes down as NVM with this write bandwidth and flush latency would."""
        self._native.set_nvm(float(write_gbps), float(flush_latency_ns))

    @locked
    def verify(self) -> int:
        """Check the committed epoch: the catalog and tags against its record, every checkpoint
        copy, and (a cleanly closed heap) the working data; returns how many units were checked.
        Raises CorruptHeapError naming the object and the bytes."""
        return watch(f"verify {os.path.basename(self.path)}", lambda: _call(self._native.verify),
                     self._native.progress)

    @locked
    def expose(self, name: str) -> None:
        """Let system calls write into object `name`: ``os.readv``, ``readinto``, ``recv_into``,
        MPI receives (MPICH's CMA path).  Needed only when :attr:`kernel_writable` is False
        (the mprotect-based trackers, where such a write fails with EFAULT): the object's pages
        then stay writable and it is copied whole at every checkpoint.  A no-op otherwise.

        >>> import hpcckpt, tempfile, os
        >>> heap = hpcckpt.Heap.create(os.path.join(tempfile.mkdtemp(), "k.heap"), "4MiB", tracker="mprotect")
        >>> halo = heap.array("halo", 512)
        >>> heap.expose("halo")
        >>> with open(os.devnull, "rb") as f:
        ...     f.readinto(halo)
        0
        >>> heap.close()
        """
        index = self._names.get(name)
        if index is None:
            raise KeyError(f"{self.path}: no object named {name!r}")
        _call(self._native.expose, index)

    @locked
    def put_only(self, name: str) -> None:
        """Promise that pool `name` is written only through :meth:`Pool.put` from now on: no
        tracker watches its pages, so a checkpoint costs what was put, however large the pool
        (the uffd tracker otherwise scans every page of it).  ``pool[i]`` then gives read-only
        views.  A promise of this process: after a reopen, declare it again (README "Decisions").

        >>> import tempfile, os
        >>> h = Heap.create(os.path.join(tempfile.mkdtemp(), "q.heap"), "4MiB")
        >>> p = h.pool("p", "f8", 100)
        >>> h.put_only("p"); p.writes
        'put'
        >>> h.close()
        """
        index = self._names.get(name)
        if index is None:
            raise KeyError(f"{self.path}: no object named {name!r}")
        if _call(self._native.lookup, index)[5] != _KIND_POOL:
            raise TypeError(f"{self.path}: {name!r} is an array; only pools are written through put")
        _call(self._native.put_only, index)
        self._put_only.add(name)
        self._gen += 1

    @property
    def kernel_writable(self) -> bool:
        """Can system calls (read, recv, MPI's CMA) write into this heap's arrays?  Not under the
        mprotect-based trackers: a protected page makes the kernel fail with EFAULT, not fault;
        :meth:`expose` the objects they write into."""
        return self.tracker in ("uffd", "hash", "full") or (self.tracker == "page" and _native.UFFD_SUPPORTED)

    def _info(self) -> dict:
        return _call(self._native.info)

    @property
    def epoch(self) -> int | None:
        """The last committed epoch, or None before the first checkpoint."""
        return self._info()["committed"] or None

    @property
    def meta(self) -> dict:
        """The metadata saved with the last committed epoch ({} before the first)."""
        blob = _call(self._native.meta)
        return json.loads(blob) if blob else {}

    @property
    def stats(self) -> dict:
        """Figures of the last checkpoint of this heap, a dict:

        - counters (ints): ``epoch``, ``objects_dirty``, ``units_dirty`` (objects of the small
          classes, pages of large objects), ``bytes_dirty``, ``bytes_copied``, ``bytes_meta``
          (tags, catalog entries, the epoch record), ``bytes_page_baseline`` (what a
          page-grained tracker would have copied), ``pages_dirty``, ``views_degraded``,
          ``faults``, ``copy_threads`` (the threads this rank's copy ran on);
        - times in seconds (floats): ``t_scan``, ``t_copy``, ``t_flush``, ``t_commit``,
          ``t_nvm_delay`` (the NVM model's added delay);
        - ``tracker``; ``total`` and ``max``: the same counters and times summed and maximised
          over the ranks (under MPI; a single process has them too, equal to its own);
        - with an export directory, ``export``: ``started``, ``skipped``, ``t_stall``, ``t_wait``,
          ``t_vote``, ``t_start``;
        - ``page_table_bytes``: this process's page tables now (``VmPTE``), which grow with the
          views the trackers map (read when asked, not at each checkpoint).

        Empty before the first checkpoint of this process.
        """
        return {**self._stats, "page_table_bytes": _page_table_bytes()} if self._stats else {}

    @property
    def info(self) -> dict:
        """Geometry, owner and allocator state of the heap."""
        return self._info()

    def __repr__(self) -> str:
        return f"<hpcckpt.Heap {self.path!r}: {len(self)} objects, tracker={self.tracker}, epoch={self.epoch}>"


def _page_table_bytes() -> int:
    """VmPTE of this process in bytes (0 where /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPTE:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def block_shape(desc: dict) -> list[int]:
    """The block a distributed object holds of its global shape: an array without its halo, a pool's rows.

    >>> block_shape({"kind": 1, "shape": [6, 4], "count": 1, "layout": {"halo": [1, 0]}})
    [4, 4]
    """
    if desc["kind"] == _KIND_POOL:
        return [desc["count"]]
    return [s - 2 * w for s, w in zip(desc["shape"], desc["layout"]["halo"])]


def _make_layout(name: str, shape: tuple, global_shape, offset, halo, replicated: bool) -> dict | None:
    """The declaration of a distributed or replicated object, checked against its local shape."""
    if replicated:
        if global_shape is not None or offset is not None or halo is not None:
            raise ValueError(f"{name!r}: a replicated object is whole on every rank; give no global shape, offset or halo")
        return {"global_shape": list(shape), "offset": [0] * len(shape), "halo": [0] * len(shape), "replicated": True}
    if global_shape is None and offset is None and halo is None:
        return None
    if global_shape is None or offset is None:
        raise ValueError(f"{name!r}: a distributed object needs both global_shape= and offset=")
    nd = len(shape)
    g, o = [int(x) for x in np.atleast_1d(global_shape)], [int(x) for x in np.atleast_1d(offset)]
    h = [0] * nd if halo is None else [int(x) for x in (np.atleast_1d(halo) if np.ndim(halo) else [halo] * nd)]
    if not len(g) == len(o) == len(h) == nd:
        raise ValueError(f"{name!r}: global_shape {g}, offset {o} and halo {h} need one value per axis of {shape}")
    inner = [s - 2 * w for s, w in zip(shape, h)]
    if any(w < 0 for w in h) or any(n < 0 for n in inner):
        raise ValueError(f"{name!r}: halo {h} does not fit in the local shape {shape}")
    if any(x < 0 or x + n > gs for x, n, gs in zip(o, inner, g)):
        raise ValueError(f"{name!r}: block {inner} at offset {o} lies outside the global shape {g}")
    return {"global_shape": g, "offset": o, "halo": h, "replicated": False}


def _check_room(path: str, capacity: int, preallocate: bool) -> None:
    """A heap file grows to about 3x its capacity (data and two checkpoint copies): refuse with
    `preallocate` when the file system cannot hold that, else warn (writes past the free space
    would end the process with SIGBUS)."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return
    need, free = 3 * capacity, st.f_bavail * st.f_frsize
    if need <= free:
        return
    size = lambda b: f"{b / (1 << 40):.1f} TiB" if b >= 1 << 40 else f"{b / (1 << 30):.1f} GiB"   # noqa: E731
    text = (f"{path}: a capacity of {size(capacity)} needs up to {size(need)} (data and two checkpoint copies) "
            f"and the file system has {size(free)} free")
    if preallocate:
        raise HeapFullError(f"{text}; choose a capacity of at most {size(free // 3)}")
    warnings.warn(f"{text}: writing past that ends the process (SIGBUS); choose a smaller capacity, or "
                  "preallocate=True to reserve it now", RuntimeWarning, stacklevel=3)


def _declared_as(kind: int, dtype: str, shape: Any, count: int, layout: dict | None = None) -> str:
    """How an object was declared, in words: "an array of shape (4, 5) of '<f8'"."""
    shape, spread = tuple(shape), (f", a block of global shape {list(layout['global_shape'])}" if layout else "")
    if kind == _KIND_POOL:
        return f"a pool of {count} objects of shape {shape} of {dtype}{spread}"
    if kind == _KIND_ARRAY:
        return f"an array of shape {shape} of {dtype}{spread}"
    return f"an object of kind {kind}, shape {shape}, count {count} of {dtype}{spread}"


def _call(fn, *args):
    """Call the binding; OSErrors become hpcckpt errors that name the file."""
    try:
        return fn(*args)
    except OSError as e:
        raise translate(e) from None
