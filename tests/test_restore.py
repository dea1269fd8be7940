"""Restore from an export as a program meets it: pools, plain arrays and tables read straight
from the rank files into the heap (every chunk checked), at the same and another rank count,
and the epoch restored from the export has no local copy until the first checkpoint."""
from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest
from mpijobs import launch

pytestmark = pytest.mark.timeout(600)

JOB = """
import os, signal, sys, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD; r, n = comm.rank, comm.size
root, exports, mode = sys.argv[1:4]
REC = np.dtype([("x", "f8"), ("id", "i8"), ("pad", "V48")])     # 64-byte records
P, A = 300_000, (1500, 600)                                     # several 4 MiB chunks per block

def split(total):
    rows = np.array_split(np.arange(total), n)[r]
    return int(rows[0]), len(rows)

def records(lo, k):
    out = np.zeros(k, REC); out["id"] = np.arange(lo, lo + k); out["x"] = 0.5 * out["id"]; return out

heap = hpcckpt.open("j", comm, root=root, capacity="256MiB", export_dir=exports,
                    export_every=1 if mode == "export-every" else 0)
(plo, pn), (alo, an) = split(P), split(A[0])
if mode == "write":
    p = heap.pool("p", REC, pn, global_count=P, offset=plo)
    p.put(np.arange(pn), records(plo, pn))
    a = heap.array("a", (an, A[1]), "f8", global_shape=A, offset=(alo, 0))
    a[...] = np.arange(alo * A[1], (alo + an) * A[1]).reshape(an, A[1])
    t = heap.table("t", REC, distributed=True)
    t.append(records(plo, pn))
    heap.checkpoint(step=7)
    heap.export()
    heap.close()
    sys.exit(0)

def check():
    p, a, t = heap["p"], heap["a"], heap["t"]
    assert len(p) == pn and np.array_equal(p.take(np.arange(pn)), records(plo, pn)), "pool"
    assert np.array_equal(a, np.arange(alo * A[1], (alo + an) * A[1]).reshape(an, A[1])), "array"
    assert np.array_equal(t.rows, records(plo, pn)), "table"

check()
said = f"{heap.restored_from}:{heap.epoch}:{heap.meta.get('step')}"
if mode == "crash":                  # killed before any checkpoint after the restore
    comm.Barrier(); os.kill(os.getpid(), signal.SIGKILL)
if mode == "export":                 # the export it came from, not a second one
    before = sorted(os.listdir(os.path.join(exports, "j")))
    said += ":" + os.path.basename(heap.export().path)
    assert sorted(os.listdir(os.path.join(exports, "j"))) == before
if mode == "verify":                 # nothing local to check yet: the export was checked as read
    said += f":{heap.verify()}"
if mode == "export-every":           # the first export after the restore carries its own epoch's meta
    heap["a"][...] = 2.0
    said += f":{heap.checkpoint(step=8)}:{heap.meta}"
if mode == "redeclare-crash":        # another block, then killed between the vote and its tiling check
    lo, hi = (0, 600) if r == 0 else (600, A[0])
    heap.array("a", (hi - lo, A[1]), "f8", global_shape=A, offset=(lo, 0))
    os.environ["HPCCKPT_CRASH_AT"] = "after-allreduce@2"
    heap.checkpoint(step=8)
if mode == "checkpoint-crash":       # the first checkpoint copies everything; then a crash
    said += f":{heap.checkpoint(step=8)}"
    assert heap.stats["bytes_copied"] >= 2 * pn * 64 + an * A[1] * 8
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    assert not [f for f in held if f.startswith(exports)], held   # the export's files are let go
    heap["a"][...] = -1.0
    comm.Barrier(); os.kill(os.getpid(), signal.SIGKILL)
said = comm.gather(said)
heap.close()
if r == 0:
    print(*said, flush=True)
"""


def job(n: int, heap_dir: str, mode: str):
    return launch(["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(JOB),
                   os.path.join(heap_dir, "heaps"), os.path.join(heap_dir, "exports"), mode], timeout=300)


def exported(heap_dir: str, writers: int) -> None:
    proc = job(writers, heap_dir, "write")
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(os.path.join(heap_dir, "heaps"))


@pytest.mark.parametrize("writers,readers", [(3, 2), (2, 2), (2, 3)])
def test_pools_arrays_and_tables_restore_exactly_from_the_rank_files(heap_dir, writers, readers):
    exported(heap_dir, writers)
    proc = job(readers, heap_dir, "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7"] * readers


@pytest.mark.parametrize("dataset", ["p", "a"])
def test_a_flipped_byte_in_a_block_read_straight_into_the_heap_is_refused_naming_the_file(heap_dir, dataset):
    import h5py

    exported(heap_dir, 2)
    bad = os.path.join(heap_dir, "exports", "j", "e1", "rank1.h5")
    with h5py.File(bad, "r") as f:
        at = f[dataset].id.get_offset() + 4096 * 3 + 9
    with open(bad, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x04]))
    proc = job(2, heap_dir, "plain")
    assert proc.returncode != 0
    assert bad in proc.stderr and "do not match their checksum" in proc.stderr


def test_a_crash_before_the_first_checkpoint_after_a_restore_restores_the_export_again(heap_dir):
    exported(heap_dir, 3)
    assert job(2, heap_dir, "crash").returncode != 0
    proc = job(2, heap_dir, "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7"] * 2


def test_a_close_right_after_a_restore_keeps_the_data_and_the_exports_metadata(heap_dir):
    exported(heap_dir, 3)
    assert job(2, heap_dir, "plain").returncode == 0
    proc = job(2, heap_dir, "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["local:2:7"] * 2


def test_exporting_the_restored_epoch_returns_the_export_it_came_from(heap_dir):
    exported(heap_dir, 2)
    proc = job(2, heap_dir, "export")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7:e1.h5"] * 2


def test_the_first_checkpoint_after_a_restore_copies_everything_and_restores_locally(heap_dir):
    exported(heap_dir, 3)
    assert job(2, heap_dir, "checkpoint-crash").returncode != 0
    proc = job(2, heap_dir, "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["local:2:8"] * 2


def test_verify_right_after_a_restore_has_no_local_epoch_to_check(heap_dir):
    exported(heap_dir, 2)
    proc = job(2, heap_dir, "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7:0"] * 2


def test_the_first_export_after_a_restore_carries_the_new_epochs_metadata(heap_dir):
    from hpcckpt.manifest import load_manifest
    exported(heap_dir, 3)
    proc = job(2, heap_dir, "export-every")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7:2:{'step':", "8}"] * 2
    assert load_manifest(os.path.join(heap_dir, "exports", "j"), 2).meta == {"step": 8}


def test_a_kill_before_the_tiling_check_of_the_first_checkpoint_restores_the_export_without_crying_damage(heap_dir):
    exported(heap_dir, 3)
    assert job(2, heap_dir, "redeclare-crash").returncode != 0
    proc = job(2, heap_dir, "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7"] * 2
    assert "holds no local copy of epoch 1" in proc.stderr
    assert "Corrupt" not in proc.stderr and "damaged" not in proc.stderr


PARTNER_JOB = """
import os, sys, signal, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD; r = comm.rank
root, exports, mode = sys.argv[1:4]
heap = hpcckpt.open("j", comm, root=root, capacity="64MiB", export_dir=exports, redundancy="partner")
if mode == "write":
    heap.array("a", (100, 50), "f8", global_shape=(200, 50), offset=(100 * r, 0))[...] = 1.0
    heap.checkpoint(step=7); heap.export(); heap.close(); sys.exit(0)
said = comm.gather(f"{heap.restored_from}:{heap.epoch}:{heap.meta['step']}:{float(heap['a'].mean())}")
if mode == "checkpoint-kill":        # rank 1 dies in the first checkpoint after the restore
    heap["a"][...] = 2.0
    heap.checkpoint(step=8)
heap.close()
if r == 0:
    print(*said, flush=True)
"""


def test_a_rank_killed_in_the_first_checkpoint_after_a_restore_with_partner_copies_restores_the_export(heap_dir):
    root, exports = os.path.join(heap_dir, "heaps"), os.path.join(heap_dir, "exports")

    def run(mode, **env):
        return launch(["mpiexec", "-n", "2", sys.executable, "-c", textwrap.dedent(PARTNER_JOB), root, exports, mode],
                      env={"HPCCKPT_NODE_OF_RANK": "0,1", **env}, timeout=300)

    assert run("write").returncode == 0
    for f in os.listdir(os.path.join(root, "j")):   # the local heaps go; the partner copies (epoch 1) stay
        if f.startswith("rank") and f.endswith(".heap"):
            os.unlink(os.path.join(root, "j", f))
    assert run("checkpoint-kill", HPCCKPT_CRASH_AT="before-copy@2:1").returncode != 0
    proc = run("plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1:7:1.0"] * 2
    assert "Corrupt" not in proc.stderr and "damaged" not in proc.stderr
