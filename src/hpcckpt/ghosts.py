"""Ghost cells that are state: the halo of a block on the global edge of a distributed array.

Interior ghost cells copy a neighbour's rows and the first halo exchange refills them; ghost
cells on the global edge often hold the boundary condition, set once and never exchanged.
So an export keeps, beside each block, the halo slabs it has on a global edge (dataset
``.edge/<name>/<axis><lo|hi>`` of the rank file, each with its CRC32C, listed under the
block's ``edges`` in the manifest), and a restore at any rank count fills a block's whole
local array: its interior and interior halos from the global array (the neighbouring rows, as
an exchange would), its edge halos from the exported slabs.

A slab of axis a spans the halo along a, and along every other axis b the block's interior,
widened by the halo where the block touches b's global edge too (so corners come along and the
slabs of one side tile it exactly).

>>> [(a, s, g, n) for a, s, _, g, n in edge_boxes([6, 5], [1, 1], [0, 0], [8, 3])]
[(0, 'lo', [-1, -1], [1, 5]), (1, 'lo', [-1, -1], [5, 1]), (1, 'hi', [-1, 3], [5, 1])]
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import _native
from .manifest import ExportError
from .plan import covered, pieces


def edge_boxes(shape: list[int], halo: list[int], offset: list[int], gshape: list[int]):
    """Every edge slab of a block: (axis, side, local slices, global offset, shape)."""
    nd, out = len(shape), []
    inner = [n - 2 * h for n, h in zip(shape, halo)]
    at_lo = [offset[b] == 0 for b in range(nd)]
    at_hi = [offset[b] + inner[b] == gshape[b] for b in range(nd)]
    for a in range(nd):
        h = halo[a]
        if h == 0:
            continue
        for side, edge in (("lo", at_lo[a]), ("hi", at_hi[a])):
            if not edge:
                continue
            local, goff = [], []
            for b in range(nd):
                if b == a:
                    local.append(slice(0, h) if side == "lo" else slice(shape[a] - h, shape[a]))
                    goff.append(-h if side == "lo" else gshape[a])
                else:
                    lo = 0 if at_lo[b] else halo[b]
                    hi = shape[b] if at_hi[b] else shape[b] - halo[b]
                    local.append(slice(lo, hi))
                    goff.append(offset[b] - halo[b] + lo)
            out.append((a, side, tuple(local), goff, [s.stop - s.start for s in local]))
    return out


def write_edges(f, crcs_group, rel: str, rows_of: Callable, d: dict, dt: np.dtype, fdt: np.dtype) -> list[dict]:
    """Write the edge slabs of one exported block; `rows_of(r0, r1)` gives committed local rows."""
    lay = d["layout"]
    if not lay or lay.get("replicated") or not any(lay["halo"]):
        return []
    edges = []
    for a, side, local, goff, shape in edge_boxes(list(d["shape"]), lay["halo"], lay["offset"],
                                                 lay["global_shape"]):
        part = np.ascontiguousarray(rows_of(local[0].start, local[0].stop)[(slice(None), *local[1:])])
        path = f".edge/{d['name']}/{a}{side}"
        f.create_dataset(path, data=part.view(fdt) if fdt != dt else part)
        crc = _native.crc32c(part.view(np.uint8).reshape(-1))
        crc_arr = np.array([crc], "<u4")
        crcs_group.create_dataset(path, data=crc_arr)
        edges.append({"axis": a, "side": side, "offset": goff, "shape": shape, "file": rel, "dataset": path,
                      "crc32c": crc, "chunk_rows": max(1, shape[0]), "nchunks": 1,
                      "chunks_crc32c": _native.crc32c(crc_arr.tobytes())})
    return edges


def fill_ghosts(reader: Any, obj: dict, dt: np.dtype, target: np.ndarray, offset: list[int],
                halo: list[int], direct: Callable | None = None) -> None:
    """Fill `target` (a block at `offset`, with its halo): the interior and the interior ghosts
    from the global array's cells, ghosts on the global edge from the exported slabs (every
    byte checked).  ``direct(block, src, dst)``, if given, may copy a piece itself (True)."""
    g = obj["global_shape"]
    lo = [o - h for o, h in zip(offset, halo)]
    hi = [o + n - h for o, n, h in zip(offset, target.shape, halo)]
    cl, ch = [max(0, x) for x in lo], [min(gs, x) for x, gs in zip(hi, g)]
    if all(b > a for a, b in zip(cl, ch)):
        blocks, shape = obj["blocks"], [b - a for a, b in zip(cl, ch)]
        parts = pieces(cl, shape, [(b["offset"], b["shape"]) for b in blocks])
        if not covered(shape, parts):
            raise ExportError(f"{reader.job_dir}: the export's blocks do not cover offset {cl}, shape {shape} "
                              "(manifest damaged or inconsistent)")
        for p in parts:
            at = tuple(slice(s.start + a - w, s.stop + a - w) for s, a, w in zip(p.dst, cl, lo))
            if not (direct and direct(blocks[p.source], p.src, at)):
                target[at] = reader.read(blocks[p.source], dt, p.src)
    edges = [e for b in obj["blocks"] for e in b.get("edges", [])]
    for p in pieces(lo, list(target.shape), [(e["offset"], e["shape"]) for e in edges]):
        target[p.dst] = reader.read(edges[p.source], dt, p.src)


__all__ = ["edge_boxes", "write_edges", "fill_ghosts"]
