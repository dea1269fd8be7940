"""Restore a rank's heap from an export, on the same or another number of ranks.

Distributed objects are re-blocked: each rank gets the default split of the global shape
(``numpy.array_split`` along the first axis) and may re-declare another block before its
first checkpoint; replicated objects go to every rank; rank-private objects need the same
number of ranks.  A distributed table's rows come back to the rank that held them at the same
rank count, else split evenly in global order; its declaration with ``route=`` then sends each
row where the route says (:mod:`hpcckpt.route`).  Every byte used is checked against its CRC (see :mod:`hpcckpt.h5io`).

>>> heap = Heap.create("/tmp/r0.heap", "64MiB")                       # doctest: +SKIP
>>> fill_from_export(heap, "/scratch/exports/demo", load_manifest(d, 7), rank=0, size=2)  # doctest: +SKIP
"""
from __future__ import annotations

import math

import numpy as np

from .ghosts import fill_ghosts
from .h5io import BlockReader
from .heap import Heap, _call, _dtype_parse
from .manifest import ExportError, Manifest
from .plan import covered, default_blocks, pieces, whole

_KINDS = {"array": 1, "pool": 2}


def private_objects_that_cannot_move(m: Manifest, size: int) -> list[str]:
    """Rank-private objects that cannot follow a change of rank count."""
    if size == m.world_size:
        return []
    return sorted(n for n, o in m.objects.items() if not o["distributed"] and not o["replicated"])


def fill_from_export(heap: Heap, job_dir: str, m: Manifest, rank: int, size: int) -> BlockReader:
    """Allocate and fill every object this rank gets from the export; returns the open reader.

    Also installs ``heap._reblock`` so that a different block declared before the first
    checkpoint is read from the export again.
    """
    stuck = private_objects_that_cannot_move(m, size)
    if stuck:
        raise ExportError(f"{job_dir}: the export of epoch {m.epoch} was written by {m.world_size} ranks and "
                          f"holds rank-private objects {stuck}; restart on {m.world_size} ranks, or declare them "
                          "distributed (global_shape=, offset=) or replicated")
    reader = BlockReader(job_dir)
    for name, obj in sorted(m.objects.items()):
        dt = _dtype_parse(obj["dtype"])
        el = list(obj["element_shape"])
        if obj["kind"] == "table":
            _fill_table(heap, reader, name, obj, dt, rank, size, m.world_size)
        elif obj["distributed"]:
            rows = obj["global_shape"][:1] if obj["kind"] == "pool" else obj["global_shape"]
            offset, block = default_blocks(rows, size)[rank]
            halo = obj["blocks"][0]["halo"] if obj["kind"] == "array" else None
            if block[0] == 0:
                continue   # more ranks than rows: this rank holds none of it
            _allocate(heap, reader, name, obj, dt, el, offset, block, halo)
        elif obj["replicated"]:
            _allocate(heap, reader, name, obj, dt, el, None, None, None)
        else:
            mine = [b for b in obj["blocks"] if b["rank"] == rank]
            if mine:
                _allocate(heap, reader, name, obj, dt, el, None, None, None, source=mine[0])

    def reblock(name: str, dt: np.dtype, shape: tuple, count: int, kind: int, layout: dict):
        obj = m.objects[name]
        del heap[name]
        block = [count] if kind == 2 else [s - 2 * w for s, w in zip(shape, layout["halo"])]
        return _allocate(heap, reader, name, obj, dt, list(obj["element_shape"]), layout["offset"], block,
                         layout["halo"] if kind == 1 else None)

    heap._reblock = reblock
    return reader


def _fill_table(heap: Heap, reader: BlockReader, name: str, obj: dict, dt: np.dtype, rank: int, size: int,
                was: int) -> None:
    """A table's rows for this rank: its own rows at the same rank count, else an even split of
    the global table in global order; a distributed table is then routed when it is declared."""
    from .table import F_ROUTE, HEADER
    blocks = obj["blocks"]
    if not obj["distributed"]:
        mine = [b for b in blocks if b["rank"] == rank]
        if not mine:
            return
        offset, count, blocks = [0], mine[0]["shape"][0], mine
    elif size == was:
        b = next(b for b in blocks if b["rank"] == rank)
        offset, count = list(b["offset"]), b["shape"][0]
    else:
        offset, (count,) = default_blocks(obj["global_shape"], size)[rank]
    t = heap.table(name, dt, distributed=obj["distributed"], capacity=count)
    parts = pieces(offset, [count], [(b["offset"], b["shape"]) for b in blocks])
    if not covered([count], parts):
        raise ExportError(f"{reader.job_dir}: the export's blocks of table {name!r} do not cover rows "
                          f"{offset[0]}..{offset[0] + count} (manifest damaged or inconsistent)")
    index = heap._names[name]
    for p in parts:   # by the C core from the rank file, else through numpy, checked
        if reader.fill(blocks[p.source], dt, p.src, heap, index, HEADER + p.dst[0].start * dt.itemsize):
            continue
        view = t._view(p.dst[0].start, p.dst[0].stop)
        if not (heap.kernel_writable and reader.read_into(blocks[p.source], dt, p.src, view)):
            view[...] = reader.read(blocks[p.source], dt, p.src)
    t._set_len(count)
    if obj["distributed"]:
        t._set_flags(t.flags | F_ROUTE)


def _allocate(heap: Heap, reader: BlockReader, name: str, obj: dict, dt: np.dtype, el: list[int], offset, block,
              halo, source: dict | None = None):
    """Create one object (distributed block, replicated whole, or private) and fill it."""
    if obj["replicated"] or source is not None:
        b = source or obj["blocks"][0]
        shape = list(b["shape"])
        if obj["kind"] == "pool":
            target = heap.pool(name, dt, shape[0], tuple(el), replicated=obj["replicated"])
        else:
            target = heap.array(name, tuple(shape), dt, replicated=obj["replicated"])
        _fill(reader, name, obj, dt, target, [0] * len(shape), shape, [0] * len(shape), [b], heap)
        return target
    if obj["kind"] == "pool":
        target = heap.pool(name, dt, block[0], tuple(el), global_count=obj["global_shape"][0], offset=offset[0])
        full_off, full_shape, halo = list(offset) + [0] * len(el), list(block) + el, [0] * (1 + len(el))
    else:
        local = tuple(n + 2 * w for n, w in zip(block, halo))
        target = heap.array(name, local, dt, global_shape=tuple(obj["global_shape"]), offset=tuple(offset),
                            halo=tuple(halo))
        full_off, full_shape = list(offset), list(block)
        if any(halo):   # interior and interior ghosts from the global array, edge ghosts from their slabs
            fill_ghosts(reader, obj, dt, target, list(offset), list(halo), _strided(heap, reader, name, dt, target))
            return target
    _fill(reader, name, obj, dt, target, full_off, full_shape, halo, obj["blocks"], heap)
    return target


def _strided(heap: Heap, reader: BlockReader, name: str, dt: np.dtype, target: np.ndarray):
    """Copy a piece of whole exported rows into rows of the new array `target` (whose halo makes
    them strided) by the C core, when the halo leaves axes 2.. whole."""
    shape, index = target.shape, heap._names[name]
    inner, stride = math.prod(shape[2:]) * dt.itemsize, math.prod(shape[1:]) * dt.itemsize

    def direct(b: dict, src: tuple[slice, ...], dst: tuple[slice, ...]) -> bool:
        if not whole(dst[2:], shape[2:]):
            return False
        at = dst[0].start * stride + (dst[1].start * inner if len(shape) > 1 else 0)
        return reader.fill(b, dt, src, heap, index, at, stride)
    return direct


def _fill(reader: BlockReader, name: str, obj: dict, dt: np.dtype, target, offset, shape, halo, blocks,
          heap: Heap) -> None:
    """Copy every piece of the exported blocks that meets (offset, shape) into target: whole
    rows of a new object by the C core straight from the rank file (:meth:`BlockReader.fill`),
    else through numpy (HDF5 reads straight into the heap array only where the kernel may
    write there)."""
    if not shape:   # a 0-d array
        target[()] = reader.read(blocks[0], dt, ())
        return
    if math.prod(shape) == 0:
        return
    parts = pieces(offset, shape, [(b["offset"], b["shape"]) for b in blocks])
    if not covered(shape, parts):
        raise ExportError(f"{reader.job_dir}: the export's blocks of {name!r} do not cover offset {offset}, "
                          f"shape {shape} (manifest damaged or inconsistent)")
    index, row = heap._names[name], math.prod(shape[1:]) * dt.itemsize
    # objects end to end in the heap file, so that the C core writes long runs: an array, or a
    # pool of records that fill their slots (a class size) or whole pages each
    packed = obj["kind"] == "array" or (_call(heap._native.lookup, index)[3] == row and
                                        (row > 2048 or (row >= 64 and row & (row - 1) == 0)))
    for p in parts:
        rows_whole = whole(p.dst[1:], shape[1:])
        if packed and rows_whole and not any(halo) and reader.fill(blocks[p.source], dt, p.src, heap, index,
                                                              p.dst[0].start * row):
            continue
        if heap.kernel_writable and obj["kind"] == "array" and not any(halo):   # straight into the heap, checked
            if reader.read_into(blocks[p.source], dt, p.src, target[p.dst]):
                continue
        data = reader.read(blocks[p.source], dt, p.src)
        if obj["kind"] == "pool":
            rows = np.arange(p.dst[0].start, p.dst[0].stop)
            if not rows_whole:
                raise ExportError(f"{reader.job_dir}: pool {name!r} was exported in partial records")
            target.put(rows, data)
        else:
            inner = tuple(slice(w + s.start, w + s.stop) for s, w in zip(p.dst, halo))
            target[inner] = data


__all__ = ["fill_from_export", "private_objects_that_cannot_move"]
