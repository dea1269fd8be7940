"""The heap inside a real process: a forked child never untracks, unlocks, closes or corrupts
its parent's heap (it gets a detached copy-on-write view); threads that write, checkpoint
and close at once never crash it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import ALL_TRACKERS, KERNEL_TRACKERS, run_python
from mpijobs import launch

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


KERNEL_WRITES = """
import os, socket, numpy as np, hpcckpt
path, tracker = os.environ["HEAP"], os.environ["TRACKER"]
heap = hpcckpt.Heap.create(path, "16MiB", tracker=tracker)
a, b, c = heap.array("a", 4096, "u1"), heap.array("b", 16384, "u1"), heap.array("c", 1 << 20, "u1")
heap.checkpoint()
if not heap.kernel_writable:
    for name in "abc":
        heap.expose(name)
src = path + ".src"
with open(src, "wb") as f:
    f.write(bytes(range(256)) * 4096)
fd = os.open(src, os.O_RDONLY)
assert os.readv(fd, [b]) == 16384
os.close(fd)
with open(src, "rb") as f:
    assert f.readinto(c) == 1 << 20
s1, s2 = socket.socketpair()
s1.sendall(b"\\x07" * 4096)
assert s2.recv_into(a) == 4096
heap.checkpoint()
heap._native.abandon()                          # a crash: only what the checkpoint saw survives
heap = hpcckpt.Heap.open(path, tracker=tracker)
assert (heap["a"] == 7).all() and heap["b"].tobytes() == bytes(range(256)) * 64
assert heap["c"].tobytes() == bytes(range(256)) * 4096
heap.close()
print("ok")
"""


@pytest.mark.parametrize("tracker", ALL_TRACKERS)
def test_readv_readinto_and_recv_into_heap_arrays_are_checkpointed(heap_path, tracker):
    proc = run_python(KERNEL_WRITES, env={"HEAP": heap_path, "TRACKER": tracker})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


MPI_RECV = """
import os, sys, numpy as np, hpcckpt
from mpi4py import MPI
comm, tracker = MPI.COMM_WORLD, sys.argv[2]
heap = hpcckpt.open("recv", comm, root=sys.argv[1], capacity="32MiB", tracker=tracker)
big, small = heap.array("big", 1 << 19), heap.array("small", 16)   # 4 MiB: MPICH's CMA path; 128 B
heap.checkpoint(step=0)
if not heap.kernel_writable:
    heap.expose("big"), heap.expose("small")
if comm.rank == 0:
    comm.Send(np.arange(1 << 19, dtype="f8"), dest=1)
    comm.Send(np.full(16, 3.0), dest=1)
else:
    comm.Recv(big, source=0)
    comm.Recv(small, source=0)
heap.checkpoint(step=1)
heap._native.abandon()
heap = hpcckpt.open("recv", comm, root=sys.argv[1], capacity="32MiB", tracker=tracker)
if comm.rank == 1:
    assert (heap["big"] == np.arange(1 << 19)).all() and (heap["small"] == 3.0).all()
heap.close()
print("ok", comm.rank, flush=True)
"""


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS)
def test_mpi_receives_into_heap_arrays_small_and_4mib_are_checkpointed(heap_dir, tracker):
    proc = launch(["mpiexec", "-n", "2", sys.executable, "-c", MPI_RECV, heap_dir, tracker], timeout=120)
    assert proc.returncode == 0 and sorted(proc.stdout.split()) == ["0", "1", "ok", "ok"], proc.stderr[-2000:]
