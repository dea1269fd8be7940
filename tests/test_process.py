"""The heap inside a real process: a forked child never untracks, unlocks, closes or corrupts
its parent's heap (it gets a detached copy-on-write view)."""
from __future__ import annotations

import pytest
from conftest import ALL_TRACKERS, run_python

FORK = """
import multiprocessing as mp, os, sys, hpcckpt
path, tracker = os.environ["HEAP"], os.environ["TRACKER"]
with hpcckpt.Heap.create(path, "4MiB", tracker=tracker) as heap:
    heap.array("a", 1000)[:] = 1
    heap.checkpoint(step=1)
heap = hpcckpt.Heap.open(path, tracker=tracker)
a = heap["a"]

def child():
    a[:5] = 7                    # lands in the child's own copy
    with heap:                   # a normal exit from a with block, in the child
        pass
    try:
        heap.checkpoint()
    except hpcckpt.HeapError:
        print("child cannot checkpoint", flush=True)

p = mp.get_context("fork").Process(target=child)
p.start(); p.join()
assert p.exitcode == 0, p.exitcode
assert a[:6].tolist() == [1.0] * 6, a[:6]
try:
    hpcckpt.Heap.open(path)
    raise SystemExit("the child released the parent's lock")
except hpcckpt.HeapBusyError:
    pass
a[10] = 3
heap.checkpoint(step=2)
assert heap.stats["bytes_copied"] > 0
heap._native.abandon()           # the parent crashes: its heap was never marked clean by the child
with hpcckpt.Heap.open(path, tracker=tracker) as again:
    assert again.restored and again.meta == {"step": 2}
    assert again["a"][:6].tolist() == [1.0] * 6 and again["a"][10] == 3
print("ok")
"""


@pytest.mark.parametrize("tracker", ALL_TRACKERS)
def test_forked_child_never_unlocks_marks_clean_or_writes_the_parents_heap(heap_path, tracker):
    proc = run_python(FORK, env={"HEAP": heap_path, "TRACKER": tracker})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["child cannot checkpoint", "ok"], proc.stdout
