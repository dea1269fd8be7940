"""The heap inside a real process: a forked child never untracks, unlocks, closes or corrupts
its parent's heap (it gets a detached copy-on-write view); threads that write, checkpoint
and close at once never crash it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

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


CLOSE_WHILE_WRITING = """
import os, sys, threading, numpy as np, hpcckpt
path, tracker = os.environ["HEAP"], os.environ["TRACKER"]
src = np.ones(1 << 18)
for it in range(int(os.environ["ITERATIONS"])):
    heap = hpcckpt.Heap.create(path, "8MiB", tracker=tracker)
    big = heap.array("big", 1 << 18)
    go = threading.Event()
    def writer():
        go.set()
        for _ in range(8):
            np.multiply(src, 2.0, out=big)   # numpy drops the GIL: a real concurrent writer
    t = threading.Thread(target=writer)
    t.start(); go.wait()
    heap.close()
    t.join()
    assert (big == 2.0).all()                # the late writes landed in the detached copy
    del big, heap
    os.unlink(path)
print("ok")
"""


@pytest.mark.parametrize("tracker", ["mprotect", "uffd"])
def test_close_while_another_thread_writes_never_crashes(heap_path, tracker):
    proc = run_python(CLOSE_WHILE_WRITING, env={"HEAP": heap_path, "TRACKER": tracker, "ITERATIONS": "500"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


CLOSE_WHILE_CHECKPOINTING = """
import os, sys, threading, hpcckpt
sys.setswitchinterval(1e-6)                  # switch threads as often as possible
path, tracker = os.environ["HEAP"], os.environ["TRACKER"]
for it in range(int(os.environ["ITERATIONS"])):
    heap = hpcckpt.Heap.create(path, "4MiB", tracker=tracker)
    a = heap.array("a", 100)
    def checkpoints():
        try:
            for k in range(50):
                a[k] = k
                heap.checkpoint(step=k)
                heap.array(f"t{k}", 10)
        except hpcckpt.HeapError as e:
            assert "closed" in str(e), e
    t = threading.Thread(target=checkpoints)
    t.start()
    heap.close()                              # waits for a checkpoint in flight
    t.join()
    again = hpcckpt.Heap.open(path, tracker=tracker)
    assert not again.restored
    again.close()
    os.unlink(path)
print("ok")
"""


@pytest.mark.parametrize("tracker", ["mprotect", "uffd"])
def test_close_racing_checkpoint_threads_waits_and_never_crashes(heap_path, tracker):
    proc = run_python(CLOSE_WHILE_CHECKPOINTING, env={"HEAP": heap_path, "TRACKER": tracker, "ITERATIONS": "500"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


HANDLERS = """
import ctypes, faulthandler, os, sys, hpcckpt
heap = hpcckpt.Heap.create(os.environ["HEAP"], "4MiB", tracker="mprotect")
a = heap.array("a", 1000)
getattr(faulthandler, os.environ["CALL"])()   # installs or removes a SIGSEGV handler after the heap's
a[5] = 1.0                                     # a tracked write
heap.checkpoint()
a[700] = 2.0
assert heap.checkpoint() and heap.stats["bytes_copied"] == 8000 - 4096, heap.stats   # the second page
heap.close()
print("tracked writes ok", flush=True)
ctypes.memset(0, 1, 1)                         # a genuine NULL write: line 12
print("survived")
"""


@pytest.mark.parametrize("call,flags", [("enable", []), ("disable", ["-X", "faulthandler"])])
def test_signal_handlers_installed_after_the_heap_keep_tracking_and_genuine_faults_still_crash(
        heap_path, call, flags):
    proc = subprocess.run([sys.executable, *flags, "-c", HANDLERS], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HEAP=heap_path, CALL=call))
    assert proc.stdout.splitlines() == ["tracked writes ok"], proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGSEGV, proc.returncode
    if call == "enable":                          # faulthandler saw the real fault, at its line
        assert 'File "<string>", line 12' in proc.stderr, proc.stderr
