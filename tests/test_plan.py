"""The restore plan (N -> M block intersections) and the checksum arithmetic it relies on."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from hpcckpt import _native
from hpcckpt.plan import covered, default_blocks, pieces


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 5), n=st.integers(1, 9), m=st.integers(1, 9),
       cut=st.integers(1, 4))
def test_every_new_block_is_assembled_exactly_from_the_old_blocks(rows, cols, n, m, cut):
    glob = np.arange(rows * cols).reshape(rows, cols)
    old = default_blocks((rows, cols), n)
    # the old blocks may also be cut along the second axis (a 2D decomposition)
    old = [([o[0], c0], [s[0], len(cs)]) for o, s in old
           for c0, cs in ((int(c[0]), c) for c in np.array_split(np.arange(cols), min(cut, cols)))]
    data = [glob[o[0]:o[0] + s[0], o[1]:o[1] + s[1]] for o, s in old]
    for offset, shape in default_blocks((rows, cols), m):
        out = np.full(shape, -1)
        parts = pieces(offset, shape, old)
        assert covered(shape, parts)
        for p in parts:
            out[p.dst] = data[p.source][p.src]
        assert np.array_equal(out, glob[offset[0]:offset[0] + shape[0]])


def test_default_split_is_numpy_array_split_along_the_first_axis():
    assert default_blocks((10, 3), 4) == [([0, 0], [3, 3]), ([3, 0], [3, 3]), ([6, 0], [2, 3]), ([8, 0], [2, 3])]
    assert default_blocks((2,), 3) == [([0], [1]), ([1], [1]), ([2], [0])]


def reference_crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), skip=st.integers(0, 63), start=st.integers(0, 2**32 - 1))
def test_crc32c_equals_the_bitwise_definition_at_every_length_and_alignment(data, skip, start):
    buf = memoryview(bytes(skip) + data)[skip:]              # every alignment of the folding loads
    assert _native.crc32c(buf, start) == reference_crc32c(data, start)


def test_crc32c_check_value_and_long_buffers():
    assert _native.crc32c(b"123456789") == 0xE3069283
    big = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    assert _native.crc32c(big) == _native.crc32c(big[777:], _native.crc32c(big[:777]))
    assert _native.crc32c(big[:70_001]) == reference_crc32c(big[:70_001])


@given(a=st.binary(max_size=300), b=st.binary(max_size=5000))
def test_crc32c_of_two_pieces_combines_into_the_crc_of_the_whole(a, b):
    assert _native.crc32c_combine(_native.crc32c(a), _native.crc32c(b), len(b)) == _native.crc32c(a + b)
    assert _native.crc32c(b, _native.crc32c(a)) == _native.crc32c(a + b)


def test_the_default_split_is_computed_not_listed_and_matches_array_split():
    import numpy as np

    from hpcckpt.plan import default_blocks
    for n in (0, 1, 5, 37):
        for k in (1, 2, 3, 7):
            assert [s[0] for _, s in default_blocks([n, 2], k)] == [len(p) for p in np.array_split(np.arange(n), k)]
    blocks = default_blocks([1 << 40, 8], 4)    # 2^40 rows: a list of them would need 8 TiB
    assert blocks[-1] == ([3 << 38, 0], [1 << 38, 8])
