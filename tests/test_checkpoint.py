"""Local checkpoints: what is copied, what comes back after a crash, and the protocol's crash points."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import hpcckpt
from conftest import ALL_TRACKERS, KERNEL_TRACKERS, run_python

REC = np.dtype([("x", "f8"), ("y", "f8"), ("id", "i8")])


def crash(heap: hpcckpt.Heap) -> None:
    """End the heap as a SIGKILL would: nothing more is written."""
    heap._native.abandon()


def test_epoch_and_meta_before_and_after_checkpoints(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        assert heap.epoch is None and heap.meta == {}
        assert heap.checkpoint(step=10, t=0.5) == 1
        assert heap.checkpoint(step=20) == 2
        assert heap.epoch == 2 and heap.meta == {"step": 20}


@pytest.mark.parametrize("tracker", ALL_TRACKERS)
def test_restore_after_crash_gives_the_last_checkpoint(heap_path, tracker):
    heap = hpcckpt.Heap.create(heap_path, "16MiB", tracker=tracker)
    grid, parts = heap.array("grid", (64, 64)), heap.pool("parts", REC, 1000)
    grid[:] = 1.0
    parts[3]["x"] = 3.0
    gone = heap.array("gone", 10)
    heap.checkpoint(step=1)
    grid[10:20] = 2.0
    parts[3]["x"] = 4.0
    del heap["gone"], gone
    heap.array("born", 10)
    crash(heap)
    with hpcckpt.Heap.open(heap_path, tracker=tracker) as heap:
        assert heap.restored and heap.epoch == 1 and heap.meta == {"step": 1}
        assert float(heap["grid"].sum()) == 64 * 64 and float(heap["parts"][3]["x"]) == 3.0
        assert "gone" in heap and "born" not in heap


@pytest.mark.parametrize("tracker", ALL_TRACKERS)
def test_crash_before_the_first_checkpoint_gives_an_empty_heap(heap_path, tracker):
    heap = hpcckpt.Heap.create(heap_path, "1MiB", tracker=tracker)
    heap.array("a", 10)[:] = 1
    crash(heap)
    with hpcckpt.Heap.open(heap_path, tracker=tracker) as heap:
        assert heap.restored and heap.epoch is None and len(heap) == 0


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS + ["hash"])
def test_only_the_written_objects_are_copied(heap_path, tracker):
    with hpcckpt.Heap.create(heap_path, "64MiB", tracker=tracker) as heap:
        parts = heap.pool("parts", "V256", 10_000)
        big = heap.array("big", 100 * 512)                 # 100 pages
        heap.checkpoint()
        for i in range(0, 10_000, 100):
            parts[i][()] = b"\1" * 256
        big[512 * 7] = 1.0
        big[512 * 50: 512 * 52] = 2.0                      # pages 50 and 51
        heap.checkpoint()
        s = heap.stats
        assert s["tracker"] == tracker and s["objects_dirty"] == 101
        assert s["bytes_copied"] == 100 * 256 + 3 * 4096
        assert s["bytes_page_baseline"] == 103 * 4096


def test_page_tracker_copies_whole_pages(heap_path):
    with hpcckpt.Heap.create(heap_path, "64MiB", tracker="page") as heap:
        parts = heap.pool("parts", "V256", 10_000)
        heap.checkpoint()
        for i in range(0, 10_000, 100):
            parts[i][()] = b"\1" * 256
        heap.checkpoint()
        assert heap.stats["bytes_copied"] == 100 * 4096


def test_page_tracker_copies_whole_pages_through_put_too(heap_path):
    with hpcckpt.Heap.create(heap_path, "64MiB", tracker="page") as heap:
        parts = heap.pool("parts", "V256", 10_000)
        heap.checkpoint()
        parts.put(np.arange(0, 10_000, 100), np.full(100, b"\1" * 256, "V256"))
        heap.checkpoint()
        assert heap.stats["bytes_copied"] == 100 * 4096
        assert heap.stats["objects_dirty"] == 100 * 16


@pytest.mark.parametrize("tracker", ALL_TRACKERS)
def test_a_put_only_pool_copies_what_was_put_and_restores_it(heap_path, tracker):
    heap = hpcckpt.Heap.create(heap_path, "64MiB", tracker=tracker)
    table = heap.pool("table", REC, 100_000, writes="put")
    other = heap.array("other", 4096)
    heap.checkpoint()
    rows = np.arange(0, 100_000, 997)
    table.put(rows, np.array([(r, -r, r) for r in rows], REC))
    other[5] = 3.0
    heap.checkpoint()
    if tracker not in ("page", "full"):                    # exactly what was put, and the page written
        assert heap.stats["bytes_copied"] == len(rows) * REC.itemsize + 4096
    table.put([1], np.array([(9, 9, 9)], REC))             # after the last checkpoint: lost in the crash
    crash(heap)
    with hpcckpt.Heap.open(heap_path, tracker=tracker) as again:
        back = again["table"]
        assert back.writes == "any"                       # a promise of the process that made it
        assert back.take(rows)["id"].tolist() == rows.tolist() and back.take([1])["id"][0] == 0
        assert float(again["other"][5]) == 3.0


def test_a_put_only_pool_gives_read_only_objects_and_only_pools_can_be_put_only(heap_path):
    with hpcckpt.Heap.create(heap_path, "16MiB") as heap:
        table = heap.pool("table", REC, 1000, writes="put")
        with pytest.raises(ValueError, match="read-only"):
            table[3]["x"] = 1.0
        heap.array("a", 10)
        with pytest.raises(TypeError, match="only pools"):
            heap.put_only("a")
        with pytest.raises(ValueError, match="writes must be"):
            heap.pool("t2", REC, 10, writes="sometimes")
        del heap["table"]
        again = heap.pool("table", REC, 1000)              # the same catalog slot, watched again
        again[3]["x"] = 2.0
        heap.checkpoint()
        again[4]["x"] = 2.0
        heap.checkpoint()
        assert again.writes == "any" and heap.stats["objects_dirty"] == 1


def test_full_tracker_copies_everything(heap_path):
    with hpcckpt.Heap.create(heap_path, "16MiB", tracker="full") as heap:
        heap.pool("parts", "V256", 1000)
        heap.checkpoint()
        heap.checkpoint()
        assert heap.stats["bytes_copied"] == 1000 * 256


WRITES = {
    "ufunc_out": lambda a: np.add(a, 1, out=a),
    "slice": lambda a: a.__setitem__(slice(3, 5), 9.0),
    "copyto": lambda a: np.copyto(a, np.full_like(a, 5.0)),
    "thread": lambda a: _in_thread(lambda: a.__setitem__(0, 7.0)),
    "ctypes_memmove": lambda a: ctypes.memmove(a.ctypes.data + 8, np.array([6.0]).ctypes.data, 8),
    "view_of_view": lambda a: a.reshape(2, 4)[1].__setitem__(slice(None), 8.0),
}


def _in_thread(fn) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS + ["page", "hash"])
@pytest.mark.parametrize("kind", sorted(WRITES))
def test_every_kind_of_write_is_seen(heap_path, tracker, kind):
    heap = hpcckpt.Heap.create(heap_path, "4MiB", tracker=tracker)
    objs = [heap.array(f"a{i}", 8) for i in range(20)]    # 64-byte objects, 20 on one page
    heap.checkpoint()
    target = objs[13]
    WRITES[kind](target)
    expected = target.copy()
    heap.checkpoint()
    if tracker != "page":
        assert heap.stats["objects_dirty"] == 1
    target[:] = -1                                       # not checkpointed: must not come back
    crash(heap)
    with hpcckpt.Heap.open(heap_path, tracker=tracker) as heap:
        assert heap["a13"].tolist() == expected.tolist()
        assert heap["a12"].tolist() == [0.0] * 8


def test_structured_field_writes_are_seen(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "4MiB")
    parts = heap.pool("parts", REC, 100)
    heap.checkpoint()
    parts[42]["y"] = 2.5
    parts[43][()] = (1.0, 2.0, 3)
    heap.checkpoint()
    assert heap.stats["objects_dirty"] == 2
    crash(heap)
    with hpcckpt.Heap.open(heap_path) as heap:
        assert float(heap["parts"][42]["y"]) == 2.5 and heap["parts"][43].item() == (1.0, 2.0, 3)


CHILD = """
import numpy as np, hpcckpt
heap = hpcckpt.Heap.create({path!r}, "32MiB", tracker={tracker!r})   # HPCCKPT_CRASH_AT=<point>@2
grid, parts = heap.array("grid", (128, 128)), heap.pool("parts", "f8", 20000)
big = heap.array("big", 1 << 18)   # 2 MiB: with HPCCKPT_THREADS=2 the copy is shared by two threads
grid[:] = big[:] = 1.0
for i in range(0, 20000, 3):
    parts[i][()] = 1.0
heap.checkpoint(step=1)
assert heap.stats["copy_threads"] == 2, heap.stats
grid[:] = big[:] = 2.0
for i in range(0, 20000, 3):
    parts[i][()] = 2.0
heap.array("born", 100)[:] = 5
heap.checkpoint(step=2)
print("survived")
"""


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS + ["hash"])
@pytest.mark.parametrize("point", ["before-copy", "mid-copy", "after-copy", "after-prepare"])
def test_restart_after_crash_at_each_point_of_the_protocol(heap_path, tracker, point):
    proc = run_python(CHILD.format(path=heap_path, tracker=tracker),
                      env={"HPCCKPT_CRASH_AT": f"{point}@2", "HPCCKPT_THREADS": "2"})
    assert proc.returncode == -9, proc.stderr
    with hpcckpt.Heap.open(heap_path, tracker=tracker) as heap:
        value = 2.0 if point == "after-prepare" else 1.0
        assert heap.restored and heap.epoch == (2 if point == "after-prepare" else 1)
        assert (heap["grid"] == value).all() and (heap["big"] == value).all()
        parts = heap["parts"]
        assert all(float(parts[i]) == value for i in range(0, 20000, 3))
        assert ("born" in heap) == (point == "after-prepare")
        assert heap.verify() > 0


def test_a_copy_shared_among_threads_copies_the_same_and_checks_out(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "64MiB")
    a, p = heap.array("a", 1 << 20), heap.pool("p", REC, 50000)
    figures = []
    for threads in (1, 2, 3):
        heap.set_threads(threads)
        a[::3] += threads
        for i in range(threads, 50000, 7):
            p[i]["x"] = threads
        heap.checkpoint()
        s = heap.stats
        figures.append((s["copy_threads"], s["bytes_copied"], s["units_dirty"], s["pages_dirty"], s["objects_dirty"]))
        assert heap.verify() > 0
    assert [f[0] for f in figures] == [1, 2, 3]
    assert len({f[1:] for f in figures[1:]}) == 1   # the same units, whoever copies them
    heap.set_threads(2)
    a[:] = 7.0
    heap.checkpoint()
    crash(heap)
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap.restored and (heap["a"] == 7.0).all() and float(heap["p"][3]["x"]) == 3
        with pytest.raises(ValueError, match="from 1 to 8"):
            heap.set_threads(0)


def test_crash_hook_from_the_environment_kills_at_that_epoch(heap_path):
    code = f"""
import hpcckpt
heap = hpcckpt.Heap.create({heap_path!r}, "1MiB")
heap.array("a", 10)[:] = 1
heap.checkpoint()
heap.close()
heap = hpcckpt.Heap.open({heap_path!r})
heap["a"][:] = 2
heap.checkpoint()
print("not reached")
"""
    proc = run_python(code, env={"HPCCKPT_CRASH_AT": "mid-copy@2"})
    assert proc.returncode == -9 and "not reached" not in proc.stdout
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap.epoch == 1 and heap["a"].tolist() == [1.0] * 10


def test_withdrawn_epoch_is_retried_and_never_restored(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "4MiB")
    a = heap.array("a", 1000)
    a[:] = 1
    heap.checkpoint()
    a[:] = 2
    native = heap._native
    assert native.prepare(b"{}") == 2
    native.withdraw()                       # another rank failed
    a[500] = 3                              # the dirty set of the withdrawn epoch is kept
    assert native.prepare(b"{}") == 2
    crash(heap)                             # prepared 2 but this crash is local: epoch 2 stands
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap.epoch == 2 and heap["a"][0] == 2 and heap["a"][500] == 3


def test_a_withdrawn_change_written_back_is_copied_again_at_the_retry(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "4MiB")
    p = heap.pool("p", "f8", 64, shape=(8,))   # 64 B records: one page
    for i in range(64):
        p[i][:] = i
    heap.checkpoint()
    p[3][:] = -3
    native = heap._native
    assert native.prepare(b"{}") == 2       # copies record 3 as -3 ...
    native.withdraw()                       # ... in vain
    p[3][:] = 3                             # back to its committed value
    p[9][0] = -9
    assert native.prepare(b"{}") == 2
    native.commit()
    crash(heap)
    with hpcckpt.Heap.open(heap_path) as heap:
        got = heap["p"]
        assert heap.epoch == 2 and got[3].tolist() == [3.0] * 8 and got[9][0] == -9
        assert all(got[i].tolist() == [float(i)] * 8 for i in range(64) if i != 9)


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS)
def test_of_objects_sharing_a_page_only_those_written_and_changed_are_copied(heap_path, tracker):
    heap = hpcckpt.Heap.create(heap_path, "16MiB", tracker=tracker)
    p = heap.pool("p", "f8", 640, shape=(8,))   # ten pages of 64 B records
    for i in range(640):
        p[i][:] = i
    heap.checkpoint()
    p[70][:] = -1
    p[71][3] = -2
    p[200][:] = 200                         # stores what is there already
    heap.checkpoint()
    copied = 2 if tracker == "uffd" else 3  # uffd compares; under mprotect the fault names it
    assert heap.stats["units_dirty"] == copied and heap.stats["bytes_copied"] == 64 * copied, heap.stats
    crash(heap)
    with hpcckpt.Heap.open(heap_path, tracker=tracker) as heap:
        want = np.repeat(np.arange(640.0), 8).reshape(640, 8)
        want[70], want[71][3] = -1, -2
        assert np.array_equal(heap["p"].take(np.arange(640)), want)


def test_objects_smaller_than_their_slot_are_compared_on_their_own_bytes(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "16MiB")
    xs = [heap.array(f"x{i}", 8, "f8") for i in range(4)]   # 64 B each, one page
    for x in xs:
        x[:] = -1
    heap.checkpoint()
    del heap["x1"], x
    xs[1] = None
    heap.checkpoint()                       # x1's slot is free; its copy still holds -1s
    y = heap.array("y", 5, "f8")            # 40 B, in x1's slot
    y[:] = 3
    heap.checkpoint()
    xs[0][0] = 5                            # writes the page y shares
    heap.checkpoint()
    assert heap.stats["units_dirty"] == 1 and heap.stats["bytes_copied"] == 64, heap.stats
    heap.close()


def test_recovery_to_the_previous_epoch_when_another_rank_did_not_prepare(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "4MiB")
    a, p = heap.array("a", 1000), heap.pool("p", "f8", 100)
    a[:] = 1
    p[5][()] = 1
    heap.checkpoint()
    a[:] = 2
    p[5][()] = 2
    del heap["p"], p
    heap._native.prepare(b"{}")             # prepared 2, never committed
    crash(heap)
    heap = hpcckpt.Heap._attach(heap_path, "auto")
    heap._recover(1)                         # the job agreed on E = 1
    assert heap.epoch == 1 and (heap["a"] == 1).all() and float(heap["p"][5]) == 1.0
    heap["a"][:] = 4
    heap.checkpoint()                        # epoch 2 again, into the right slots
    crash(heap)
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap.epoch == 2 and (heap["a"] == 4).all() and float(heap["p"][5]) == 1.0


def test_restoring_an_epoch_the_heap_cannot_hold_is_refused(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    heap.array("a", 3)
    for _ in range(3):
        heap.checkpoint()
    with pytest.raises(hpcckpt.HeapError, match="cannot restore epoch 1"):
        heap._recover(1)
    heap.close()


def test_a_flipped_byte_in_a_checkpoint_copy_is_named_on_restore(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "1MiB")
    heap.array("victim", 100)[:] = 1
    heap.checkpoint()
    info = heap.info
    crash(heap)
    with open(heap_path, "r+b") as f:           # shadow A starts right after the data area
        data = bytearray(f.read())
        shadow_a = info["off_data"] + info["capacity"]
        hit = next(i for i in range(shadow_a, shadow_a + info["capacity"]) if data[i])
        f.seek(hit)
        f.write(bytes([data[hit] ^ 0x10]))
    with pytest.raises(hpcckpt.CorruptHeapError, match="'victim'.*corrupt"):
        hpcckpt.Heap.open(heap_path)


def test_nvm_model_slows_the_copy(heap_path):
    with hpcckpt.Heap.create(heap_path, "64MiB") as heap:
        a = heap.array("a", 4 << 20)            # 32 MB
        a[:] = 1
        heap.set_nvm_model(write_gbps=2.0)
        heap.checkpoint()
        s = heap.stats
        assert s["t_copy"] + s["t_nvm_delay"] >= 32e6 / 2e9 * 0.99


def test_mprotect_beyond_the_vma_limit_degrades_and_loses_nothing(heap_path):
    pages = 2200                                  # 64 objects of class 64 per page
    heap = hpcckpt.Heap.create(heap_path, "64MiB", tracker="mprotect")
    pool = heap.pool("p", "i8", 64 * pages)
    heap.checkpoint()
    written = [i for i in range(64 * pages) if (i // 64) % 2 == 0]   # islands: no two VMAs merge
    for i in written:
        pool[i][()] = i + 1
    heap.checkpoint()
    s = heap.stats
    assert len(written) > 65_530 and s["views_degraded"] > 0 and s["objects_dirty"] >= len(written)
    crash(heap)
    with hpcckpt.Heap.open(heap_path, tracker="mprotect") as heap:
        pool = heap["p"]
        assert all(int(pool[i]) == i + 1 for i in written)
        assert int(pool[64]) == 0


FAULTHANDLER_CHILD = """
import ctypes, faulthandler, os, sys, hpcckpt
assert faulthandler.is_enabled()
heap = hpcckpt.Heap.create(os.path.join({d!r}, "fh.heap"), "4MiB", tracker="mprotect")
objs = [heap.array(f"a{{i}}", 8) for i in range(10)]
heap.checkpoint()
objs[4][:] = 1
heap.checkpoint()
print("dirty", heap.stats["objects_dirty"], flush=True)
ctypes.string_at(8)           # a genuine segfault elsewhere
"""


def test_mprotect_tracking_works_beside_faulthandler_and_real_segfaults_still_crash(heap_dir):
    import subprocess
    import sys
    import textwrap
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                           textwrap.dedent(FAULTHANDLER_CHILD.format(d=heap_dir))],
                          capture_output=True, text=True, timeout=60)
    assert "dirty 1" in proc.stdout
    assert proc.returncode == -11
    assert "Fatal Python error: Segmentation fault" in proc.stderr and "string_at" in proc.stderr
