"""The persistent heap: aliasing, allocation, reopening, and every bad input."""
from __future__ import annotations

import ctypes
import gc
import os
import stat
import struct

import numpy as np
import pytest

import hpcckpt
from conftest import KERNEL_TRACKERS


def file_offset(heap: hpcckpt.Heap, arr: np.ndarray) -> int:
    """Where in the heap file the first byte of `arr` lives."""
    i = heap.info
    rel = arr.ctypes.data - i["va_base"] - i["views_offset"]
    return i["off_data"] + rel % i["capacity"]


def test_heap_file_is_private_and_sparse(heap_path):
    hpcckpt.Heap.create(heap_path, "256MiB").close()
    st = os.stat(heap_path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_blocks * 512 < 1 << 20


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS)
def test_small_objects_share_a_physical_page_on_different_virtual_pages(heap_path, tracker):
    heap = hpcckpt.Heap.create(heap_path, "16MiB", tracker=tracker)
    a, b = heap.array("a", 32, "f8"), heap.array("b", 32, "f8")   # 256 bytes each
    assert a.ctypes.data // 4096 != b.ctypes.data // 4096
    off_a, off_b = file_offset(heap, a), file_offset(heap, b)
    assert off_a // 4096 == off_b // 4096 and abs(off_a - off_b) == 256
    b[:] = 7.0
    a[:] = np.arange(32)
    with open(heap_path, "rb") as f:
        assert np.frombuffer(os.pread(f.fileno(), 256, off_a), "f8").tolist() == list(range(32))
        assert np.frombuffer(os.pread(f.fileno(), 256, off_b), "f8").tolist() == [7.0] * 32
    heap.close()


def test_reopen_gives_the_same_objects_and_contents(heap_path):
    rec = np.dtype([("pos", "f8", (3,)), ("mass", "f4"), ("id", "i8")])
    with hpcckpt.Heap.create(heap_path, "64MiB") as heap:
        heap.array("grid", (300, 200), "f4")[:] = np.arange(60000, dtype="f4").reshape(300, 200)
        heap.array("small", 5, "i2")[:] = [1, 2, 3, 4, 5]
        parts = heap.pool("parts", rec, 5000)
        for i in range(0, 5000, 3):
            parts[i]["id"] = i
            parts[i]["pos"] = (i, -i, 0.5)
        blocks = heap.pool("blocks", "f8", 10, shape=(8, 8))
        blocks[9][:] = 3.0
    with hpcckpt.Heap.open(heap_path) as heap:
        assert sorted(heap) == ["blocks", "grid", "parts", "small"] and len(heap) == 4
        assert not heap.restored
        assert (heap["grid"] == np.arange(60000, dtype="f4").reshape(300, 200)).all()
        assert heap["small"].tolist() == [1, 2, 3, 4, 5]
        parts = heap["parts"]
        assert len(parts) == 5000 and parts.dtype == rec
        assert int(parts[2997]["id"]) == 2997 and parts[2997]["pos"].tolist() == [2997, -2997, 0.5]
        assert int(parts[2998]["id"]) == 0
        assert heap["blocks"][9].shape == (8, 8) and float(heap["blocks"][9].sum()) == 192.0


def test_a_million_pooled_objects_round_trip_and_keep_their_slots(heap_path):
    n = 1_000_000
    with hpcckpt.Heap.create(heap_path, "512MiB") as heap:
        pool = heap.pool("cells", "V256", n)
        for i in range(0, n, 9973):
            pool[i][()] = bytes([i % 251]) * 256
    with hpcckpt.Heap.open(heap_path) as heap:
        pool = heap["cells"]
        assert len(pool) == n
        for i in range(0, n, 9973):
            assert pool[i].tobytes() == bytes([i % 251]) * 256
        assert pool[1].tobytes() == bytes(256)


def _heap_mappings(heap: hpcckpt.Heap) -> int:
    """Lines of /proc/self/maps inside the heap's address-space reservation."""
    lo = heap.info["va_base"]
    hi = lo + heap.info["va_bytes"]
    with open("/proc/self/maps") as f:
        starts = [int(line.split("-", 1)[0], 16) for line in f]
    return sum(lo <= a < hi for a in starts)


def _mappings_added_by(path: str, tracker: str, n: int) -> int:
    """Mappings added to a heap's address range by holding n pooled and min(n, 2000) single objects."""
    heap = hpcckpt.Heap.create(path, "512MiB", tracker=tracker)
    before = _heap_mappings(heap)
    pool = heap.pool("p", "V256", n)
    for i in range(0, n, max(1, n // 1000)):
        pool[i][()] = b"x" * 256
    for i in range(min(n, 2000)):
        heap.array(f"s{i}", 8, "f8")[:] = 1
    heap.checkpoint()
    added = _heap_mappings(heap) - before
    heap.close()
    return added


@pytest.mark.parametrize("tracker", ["uffd", "hash"] if "uffd" in KERNEL_TRACKERS else ["hash"])
def test_mapping_count_does_not_grow_with_the_number_of_objects(heap_dir, tracker):
    small = _mappings_added_by(os.path.join(heap_dir, "small.heap"), tracker, 10)
    gc.collect()
    large = _mappings_added_by(os.path.join(heap_dir, "large.heap"), tracker, 1_000_000)
    assert small == large == 0


def test_free_then_names_and_space_are_reused(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        for round_ in range(5):
            big = heap.array("big", 100_000, "f8")     # 800 kB of a 1 MiB heap
            big[:] = round_
            heap.checkpoint(round=round_)
            del heap["big"], big
            heap.checkpoint(round=round_)
        assert "big" not in heap and len(heap) == 0


def test_not_a_heap_is_refused(heap_path):
    with open(heap_path, "wb") as f:
        f.write(b"hello world" * 1000)
    with pytest.raises(hpcckpt.CorruptHeapError, match="not an hpcckpt heap"):
        hpcckpt.Heap.open(heap_path)


def test_missing_heap_is_refused_with_its_path(heap_path):
    with pytest.raises(FileNotFoundError, match="rank0.heap"):
        hpcckpt.Heap.open(heap_path)


def _patch_superblock(path: str, offset: int, fmt: str, value) -> None:
    """Change one superblock field and re-seal its checksum (a well-formed foreign heap)."""
    with open(path, "r+b") as f:
        sb = bytearray(f.read(4096))
        struct.pack_into(fmt, sb, offset, value)
        crc = hpcckpt_crc32c(bytes(sb[:4092]))
        struct.pack_into("<I", sb, 4092, crc)
        f.seek(0)
        f.write(sb)


def hpcckpt_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_other_format_version_is_refused(heap_path):
    hpcckpt.Heap.create(heap_path, "1MiB").close()
    _patch_superblock(heap_path, 8, "<I", 99)
    with pytest.raises(hpcckpt.FormatVersionError, match="format version 99"):
        hpcckpt.Heap.open(heap_path)


def test_flipped_superblock_byte_is_repaired_from_its_twin(heap_path):
    hpcckpt.Heap.create(heap_path, "1MiB").close()
    with open(heap_path, "r+b") as f:
        f.seek(100)
        f.write(b"\x5a")
    with pytest.warns(hpcckpt.RepairWarning, match="superblock"):
        heap = hpcckpt.Heap.open(heap_path)
    heap.close()
    with open(heap_path, "rb") as f:
        first, twin = f.read(4096), (f.seek(5 * 4096), f.read(4096))[1]
    assert first == twin


def test_superblock_damaged_in_both_copies_is_refused(heap_path):
    hpcckpt.Heap.create(heap_path, "1MiB").close()
    with open(heap_path, "r+b") as f:
        for at in (100, 5 * 4096 + 100):
            f.seek(at)
            f.write(b"\x5a")
    with pytest.raises(hpcckpt.CorruptHeapError, match="superblock is corrupt"):
        hpcckpt.Heap.open(heap_path)


@pytest.mark.parametrize("keep", [100, 4096, 1 << 20])
def test_truncated_heap_is_refused(heap_path, keep):
    hpcckpt.Heap.create(heap_path, "4MiB").close()
    os.truncate(heap_path, keep)
    with pytest.raises(hpcckpt.CorruptHeapError, match="truncated"):
        hpcckpt.Heap.open(heap_path)


def test_heap_of_another_owner_is_refused_before_anything_is_written(heap_path):
    hpcckpt.Heap.create(heap_path, "1MiB", job="alpha", rank=1, world_size=4).close()
    with open(heap_path, "rb") as f:
        before = f.read()
    with pytest.raises(hpcckpt.OwnerMismatchError, match="job 'alpha', rank 1 of 4, not job 'beta', rank 1 of 4"):
        hpcckpt.Heap.open(heap_path, job="beta", rank=1, world_size=4)
    with pytest.raises(hpcckpt.OwnerMismatchError, match="rank 1 of 4, not job 'alpha', rank 1 of 8"):
        hpcckpt.Heap.open(heap_path, world_size=8)
    with open(heap_path, "rb") as f:
        assert f.read() == before


def test_heap_open_twice_is_refused(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    with pytest.raises(hpcckpt.HeapBusyError, match="already open in this process"):
        hpcckpt.Heap.open(heap_path)
    heap.close()


@pytest.mark.parametrize("name, err, words", [
    ("", ValueError, "non-empty"), ("a/b", ValueError, "'/'"), ("a\0b", ValueError, "NUL"),
    ("x" * 64, ValueError, "at most 63"), (3, ValueError, "string")])
def test_bad_names_are_refused(heap_path, name, err, words):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        with pytest.raises(err, match=words):
            heap.array(name, 3)
        assert len(heap) == 0


def test_the_same_declaration_returns_the_object_and_another_is_refused_saying_both(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        heap.array("u", 4)[:] = 2
        assert heap.array("u", 4).tolist() == [2, 2, 2, 2]     # the same lines start and resume a job
        with pytest.raises(KeyError, match=r"exists as an array of shape \(4,\) of '<f8'; the program declared "
                                           r"an array of shape \(5,\) of '<i4'"):
            heap.array("u", 5, "i4")
        with pytest.raises(KeyError, match="the program declared a pool of 4 objects"):
            heap.pool("u", "f8", 4)
        assert heap["u"].tolist() == [2, 2, 2, 2] and len(heap) == 1


def test_object_dtype_is_refused(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        with pytest.raises(TypeError, match="Python objects"):
            heap.array("o", 3, object)
        with pytest.raises(TypeError, match="Python objects"):
            heap.pool("p", [("a", "f8"), ("b", "O")], 3)


def test_capacity_exhausted_names_the_heap_and_leaves_it_usable(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        heap.array("a", 60_000, "f8")[:] = 1     # 480 kB
        with pytest.raises(hpcckpt.HeapFullError, match=r"rank0\.heap.*out of space for 'b'.*pages free"):
            heap.array("b", 100_000, "f8")
        assert "b" not in heap
        heap.array("c", 1000, "f8")[:] = 3
        heap.checkpoint()
        assert float(heap["a"].sum()) == 60_000 and float(heap["c"].sum()) == 3000


def test_catalog_exhausted_is_a_clear_error(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB", max_objects=4) as heap:
        for i in range(4):
            heap.array(f"a{i}", 1)
        with pytest.raises(hpcckpt.HeapFullError, match="catalog full"):
            heap.array("a4", 1)


def test_closing_with_live_arrays_keeps_them_usable_but_detached(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    a = heap.array("a", 100, "f8")
    a[:] = 1.0
    heap.close()
    heap.close()                     # closing twice is harmless
    a[:] = 2.0                       # no crash; the heap no longer sees it
    assert float(a.sum()) == 200.0
    with hpcckpt.Heap.open(heap_path) as again:
        assert float(again["a"].sum()) == 100.0
    del a, heap


def test_objects_after_close_raise_a_clear_error(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    heap.close()
    with pytest.raises(hpcckpt.HeapError, match="closed"):
        heap.array("x", 3)


def test_zero_size_and_scalar_arrays(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        assert heap.array("empty", (0, 5)).shape == (0, 5)
        heap.array("scalar", (), "i8")[()] = 42
    with hpcckpt.Heap.open(heap_path) as heap:
        assert int(heap["scalar"]) == 42 and heap["empty"].shape == (0, 5)


def test_writes_from_c_land_in_the_object(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        a = heap.array("a", 16, "u1")
        ctypes.memmove(a.ctypes.data, b"0123456789abcdef", 16)
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap["a"].tobytes() == b"0123456789abcdef"


def test_readonly_open_writes_nothing_and_refuses_changes(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    heap.array("a", 4)[:] = 1
    heap.checkpoint()
    heap._native.abandon()                        # crashed: the next real open must still restore
    with open(heap_path, "rb") as f:
        before = f.read()
    with hpcckpt.Heap.open(heap_path, readonly=True) as ro:
        assert ro["a"].tolist() == [1.0] * 4 and not ro["a"].flags.writeable
        assert not ro.info["was_clean"] and ro.verify() == 1
        with pytest.raises(hpcckpt.HeapError, match="read-only"):
            ro.array("b", 1)
    with open(heap_path, "rb") as f:
        assert f.read() == before
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap.restored


@pytest.mark.parametrize("dtype", [np.dtype(("u1", 64)), np.dtype((np.dtype([("x", "<f4"), ("n", ">i2")]), (3,))),
                                   np.dtype([("a", "<f8", (2,)), ("b", [("c", ">i4"), ("s", "S3")])]),
                                   np.dtype(">M8[s]"), np.dtype("<U5"), np.dtype(("<c16", (2, 2)))])
def test_every_numpy_dtype_reads_back_as_it_was_written(heap_path, dtype):
    with hpcckpt.Heap.create(heap_path, "8MiB") as heap:
        pool = heap.pool("p", dtype, 5)
        arr = heap.array("a", (3,), dtype)
        want_p, want_a = pool[2].dtype, arr.dtype
        pool[2][...] = np.frombuffer(bytes(range(dtype.itemsize)), np.uint8).view(want_p).reshape(pool[2].shape)
        raw = bytes(pool[2].tobytes())
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap["p"].dtype == dtype and heap["p"][2].dtype == want_p and heap["a"].dtype == want_a
        assert heap["p"][2].tobytes() == raw and heap["a"].shape == arr.shape


def test_a_capacity_larger_than_the_file_system_warns_and_preallocate_refuses(heap_dir):
    free = os.statvfs(heap_dir).f_bavail * os.statvfs(heap_dir).f_frsize
    with pytest.warns(RuntimeWarning, match="the file system has .* free"):
        hpcckpt.Heap.create(os.path.join(heap_dir, "big.heap"), free).close()
    with pytest.raises(hpcckpt.HeapFullError, match="choose a capacity of at most"):
        hpcckpt.Heap.create(os.path.join(heap_dir, "huge.heap"), free, preallocate=True)
    assert sorted(os.listdir(heap_dir)) == ["big.heap"]


def test_allocation_maps_no_checkpoint_copy_in_and_the_first_checkpoint_maps_copy_a(heap_path):
    """Issue 23: an allocation costs O(catalog), not three times the object; the first
    checkpoint maps in (and writes) the copy it needs; contents survive a crash exactly."""
    heap = hpcckpt.Heap.create(heap_path, "96MiB", tracker="hash")
    used = os.stat(heap_path).st_blocks * 512
    a = heap.array("a", 8 << 20, "u1")                 # 8 MiB
    p = heap.pool("p", [("k", "u8"), ("pad", "u1", (56,))], 1 << 16)   # 4 MiB of 64 B slots
    assert os.stat(heap_path).st_blocks * 512 - used < (1 << 20)
    a[:] = 7
    p.put(np.arange(1 << 16), np.ones(1 << 16, p.dtype))
    heap.checkpoint()
    # data and copy A of both, and copy B of the pool's shared pages
    assert os.stat(heap_path).st_blocks * 512 - used >= 2 * (8 << 20) + 3 * (4 << 20)
    a[: 1 << 20] = 9
    heap.checkpoint()
    a[:] = 0
    heap._native.abandon()
    with hpcckpt.Heap.open(heap_path, tracker="hash") as again:
        b = again["a"]
        assert (b[: 1 << 20] == 9).all() and (b[1 << 20:] == 7).all()
        assert (again["p"].take(np.arange(1 << 16))["k"] == 1).all()
