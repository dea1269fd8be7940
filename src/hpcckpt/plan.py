"""The restore plan: which hyperslabs of which exported blocks a rank reads (N -> M).

A block is (offset, shape) in global coordinates.  A new rank intersects its block with
every exported block and reads just those pieces.

>>> default_blocks((10, 4), 3)
[([0, 0], [4, 4]), ([4, 0], [3, 4]), ([7, 0], [3, 4])]
>>> [(p.source, p.src, p.dst) for p in pieces([4, 0], [3, 4], [([0, 0], [5, 4]), ([5, 0], [5, 4])])]
[(0, (slice(4, 5, None), slice(0, 4, None)), (slice(0, 1, None), slice(0, 4, None))), \
(1, (slice(0, 2, None), slice(0, 4, None)), (slice(1, 3, None), slice(0, 4, None)))]
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Piece(NamedTuple):
    """Part of exported block `source`: src (slices inside it) lands at dst (slices inside the target)."""

    source: int
    src: tuple[slice, ...]
    dst: tuple[slice, ...]


def default_blocks(global_shape: Sequence[int], ranks: int) -> list[tuple[list[int], list[int]]]:
    """The default split for `ranks` ranks: ``numpy.array_split`` along the first axis, computed
    (the first ``rows % ranks`` blocks get one row more), never a list of the rows.

    >>> default_blocks([10, 3], 4)
    [([0, 0], [3, 3]), ([3, 0], [3, 3]), ([6, 0], [2, 3]), ([8, 0], [2, 3])]
    """
    g = [int(x) for x in global_shape]
    base, extra = divmod(g[0], ranks)
    out, start = [], 0
    for r in range(ranks):
        n = base + (r < extra)
        out.append(([start] + [0] * (len(g) - 1), [n] + g[1:]))
        start += n
    return out


def pieces(offset: Sequence[int], shape: Sequence[int],
           blocks: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Piece]:
    """Every non-empty intersection of the target block with the exported blocks."""
    out = []
    for i, (o, s) in enumerate(blocks):
        lo = [max(a, b) for a, b in zip(offset, o)]
        hi = [min(a + m, b + n) for a, m, b, n in zip(offset, shape, o, s)]
        if all(h > l for l, h in zip(lo, hi)):
            out.append(Piece(i, tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, o)),
                             tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offset))))
    return out


def covered(shape: Sequence[int], parts: list[Piece]) -> bool:
    """Do the pieces fill the whole target (they never overlap: exported blocks tile)?"""
    total = sum(int(np.prod([s.stop - s.start for s in p.dst])) for p in parts)
    return total == int(np.prod(shape))


def whole(slices: Sequence[slice], shape: Sequence[int]) -> bool:
    """Does every slice take its axis whole (slices and shape zipped: extra axes are whole)?

    >>> whole((slice(0, 4), slice(0, 3)), (4, 3)), whole((slice(1, 4),), (4,))
    (True, False)
    """
    return all(s.start == 0 and s.stop == n for s, n in zip(slices, shape))


__all__ = ["Piece", "default_blocks", "pieces", "covered", "whole"]
