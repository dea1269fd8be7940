"""Damage and misuse found in review: each case ends in a clear error or a correct heap, never
a crash, a hang or wrong data."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hpcckpt

CATALOG = 6 * 4096                  # layout.h: superblock, four state pages, superblock twin, catalog
STATE_HWM = 4096 + 2 * 1576         # hk_state.entries_hwm, after the two 1576-byte epoch records


def test_an_allocation_cut_short_never_wipes_another_objects_space(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "4MiB")
    pool = heap.pool("p", "f8", 3000)                 # data pages 0..46, then its tag run
    pool.put(np.arange(3000), np.arange(3000.0))
    heap.checkpoint()
    hwm = heap.info["entries_hwm"]
    heap._native.abandon()
    with open(heap_path, "r+b") as f:                 # the half-written entry a SIGKILL could leave
        entry = bytearray(512)
        struct.pack_into("<QIHBBQQ", entry, 0, 0, 0xDEAD, 2, 0, 1, 0, 200)   # born 0, first_page 0, 200 pages
        f.seek(CATALOG + hwm * 512)
        f.write(entry)
        f.seek(STATE_HWM)
        f.write(struct.pack("<Q", hwm + 1))
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap.restored and sorted(heap) == ["p"]
        assert heap["p"].take(np.arange(3000)).tolist() == list(np.arange(3000.0))
        assert heap.verify() == 3000


def test_allocation_and_free_wait_for_the_prepared_epoch_to_commit(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        heap.array("a", 4)
        heap._native.prepare(b"{}")
        with pytest.raises(hpcckpt.HeapError, match="being checkpointed"):
            heap.array("b", 4)
        with pytest.raises(hpcckpt.HeapError, match="being checkpointed"):
            del heap["a"]
        heap._native.commit()
        heap.array("b", 4)
        assert sorted(heap) == ["a", "b"]


def test_faulthandler_enabled_after_an_mprotect_heap_still_dies_on_a_real_segfault(heap_dir):
    code = f"""
        import ctypes, faulthandler, os, hpcckpt
        heap = hpcckpt.Heap.create(os.path.join({heap_dir!r}, "h.heap"), "1MiB", tracker="mprotect")
        faulthandler.enable()
        heap.array("a", 8)[:] = 1
        heap.checkpoint()
        ctypes.string_at(8)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -11 and proc.stderr.count("Fatal Python error") <= 2


def test_a_pool_larger_than_the_address_space_is_refused(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        with pytest.raises(hpcckpt.HeapFullError, match="whole capacity"):
            heap.pool("huge", "V8192", 2**63 + 1)
        with pytest.raises(hpcckpt.HeapFullError, match="whole capacity"):
            heap.array("huge2", (2**40, 2**30), "f8")
        assert len(heap) == 0


def test_emptied_shared_pages_are_reused_without_reopening(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB", max_objects=4096) as heap:
        for i in range(2048):                          # 64-byte objects: 32 shared pages
            heap.array(f"s{i}", 8)
        heap.checkpoint()
        for i in range(2048):
            del heap[f"s{i}"]
        heap.checkpoint()                              # the frees commit: the pages are free again
        big = heap.array("big", 240 * 512)             # 240 of the heap's 256 pages
        big[:] = 1
        heap.checkpoint()


def test_using_a_closed_heap_raises_instead_of_crashing(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    heap.array("a", 4)
    heap.close()
    with pytest.raises(hpcckpt.HeapError, match="closed"):
        heap["a"]
    with pytest.raises(hpcckpt.HeapError, match="closed"):
        heap.verify()
    with pytest.raises(hpcckpt.HeapError, match="closed"):
        heap.checkpoint()


def test_a_flipped_size_class_byte_in_the_catalog_is_refused(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        heap.array("a", 8)                            # class 64 (index 0)
        heap.checkpoint()
    with open(heap_path, "r+b") as f:
        f.seek(CATALOG + 14)                          # hk_entry.cls of entry 0
        f.write(b"\x03")
    with pytest.raises(hpcckpt.CorruptHeapError, match="catalog entry 0 is corrupt"):
        hpcckpt.Heap.open(heap_path)


def test_bulk_access_checks_indices(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        pool = heap.pool("p", "i4", 10)
        with pytest.raises(IndexError, match="out of range"):
            pool.take([10])
        with pytest.raises(IndexError, match="out of range"):
            pool.put([-11], [1])
        pool.put([-1], [7])
        assert int(pool[9]) == 7 and pool.take([9, -1]).tolist() == [7, 7]


def test_a_wipe_torn_by_a_crash_leaves_an_openable_heap(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    heap.array("a", 8)[:] = 1
    heap.array("b", 8)[:] = 2
    heap.checkpoint()
    del heap["a"]
    heap.checkpoint()                                   # a's death commits; its entry is being wiped
    heap._native.abandon()
    with open(heap_path, "r+b") as f:                  # a wipe cut short: dead epoch kept, rest cleared
        f.seek(CATALOG + 0 * 512)
        f.write(struct.pack("<Q", 1 | 2 << 32) + bytes(504))
    with hpcckpt.Heap.open(heap_path) as heap:
        assert sorted(heap) == ["b"] and heap["b"].tolist() == [2.0] * 8
        heap.array("c", 8)
        assert heap["c"].tolist() == [0.0] * 8


def test_live_count_stays_right_after_frees_and_commits(heap_path):
    with hpcckpt.Heap.create(heap_path, "4MiB") as heap:
        for name in "abc":
            heap.array(name, 10)
        heap.checkpoint()
        del heap["a"]
        assert heap.info["entries_live"] == 2
        heap.checkpoint()                 # the free commits: its entry is released
        del heap["b"]                     # and one never committed goes at once
        heap.array("d", 3)
        del heap["d"]
        assert heap.info["entries_live"] == 1 and len(heap) == 1


@pytest.mark.parametrize("bad,error", [(np.array([2**64 - 1], np.uint64), IndexError), ([2.9], TypeError),
                                       (np.array([5], np.uint8), IndexError)])
def test_pool_put_and_take_refuse_indices_that_would_wrap_or_truncate(heap_path, bad, error):
    with hpcckpt.Heap.create(heap_path, "4MiB") as heap:
        pool = heap.pool("p", "i8", 5)
        with pytest.raises(error):
            pool.put(bad, [7])
        with pytest.raises(error):
            pool.take(bad)
        assert pool.take(np.arange(5)).tolist() == [0] * 5


def test_a_damaged_length_field_is_refused_by_info_and_verify_without_a_signal(heap_path):
    with hpcckpt.Heap.create(heap_path, "4MiB") as heap:
        heap.array("u", 10)
        heap.checkpoint()
    with open(heap_path, "r+b") as f:                 # hk_entry.dtype_len of entry 0 (offset 60)
        f.seek(CATALOG + 60)
        f.write(struct.pack("<H", 0xFFFF))
    for cmd in ("info", "verify"):
        out = subprocess.run([sys.executable, "-m", "hpcckpt", cmd, heap_path], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and "corrupt" in out.stderr and "Traceback" not in out.stderr, out.stderr


# -- where heaps may live: nobody else can replace them ----------------------------------------
from hpcckpt.mpi import private_dir   # noqa: E402


def test_a_root_of_another_user_is_refused(heap_dir):
    root = os.path.join(heap_dir, "root")
    os.mkdir(root, 0o700)
    os.chown(root, 12345, 12345)
    with pytest.raises(hpcckpt.HeapError, match="belongs to uid 12345"):
        private_dir(os.path.join(root, "job"))


def test_a_world_writable_root_without_the_sticky_bit_is_refused(heap_dir):
    root = os.path.join(heap_dir, "root")
    os.mkdir(root)
    os.chmod(root, 0o777)
    with pytest.raises(hpcckpt.HeapError, match="writable by other users.*not sticky"):
        private_dir(os.path.join(root, "job"))
    os.chmod(root, 0o1777)                                    # like /tmp: fine, the job directory is ours
    private_dir(os.path.join(root, "job"))
    assert os.stat(os.path.join(root, "job")).st_mode & 0o777 == 0o700


def test_a_job_directory_writable_by_others_is_refused(heap_dir):
    job = os.path.join(heap_dir, "job")
    os.mkdir(job)
    os.chmod(job, 0o777)
    with pytest.raises(hpcckpt.HeapError, match="mode 777.*chmod 700"):
        private_dir(job)


def test_a_job_directory_of_another_user_is_an_owner_mismatch(heap_dir):
    job = os.path.join(heap_dir, "job")
    os.mkdir(job, 0o700)
    os.chown(job, 12345, 12345)
    with pytest.raises(hpcckpt.OwnerMismatchError, match="uid 12345"):
        private_dir(job)


def test_a_symlink_planted_in_a_shared_root_is_not_followed(heap_dir):
    root, elsewhere = os.path.join(heap_dir, "root"), os.path.join(heap_dir, "elsewhere")
    os.mkdir(root)
    os.chmod(root, 0o1777)
    os.mkdir(elsewhere, 0o700)
    os.symlink(elsewhere, os.path.join(root, "job"))
    with pytest.raises(hpcckpt.HeapError, match="symbolic link"):
        private_dir(os.path.join(root, "job"))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_permission_denied_is_reported_as_such_not_as_an_owner_mismatch(heap_dir, heap_path):
    hpcckpt.Heap.create(heap_path, "1MiB").close()
    os.chmod(heap_dir, 0o755)
    code = ("import hpcckpt, os, sys\nos.setgid(65534)\nos.setuid(65534)\n"
            "try:\n    hpcckpt.Heap.open(sys.argv[1])\n"
            "except PermissionError as e:\n    print('permission', e)\n"
            "except hpcckpt.OwnerMismatchError as e:\n    print('owner', e)\n")
    out = subprocess.run([sys.executable, "-c", code, heap_path], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("permission") and heap_path in out.stdout, out.stdout + out.stderr
