"""HDF5 export and restart anywhere: under the real mpiexec at several sizes, through the
relauncher, with timeouts.  Each export is read back in a separate process (h5py, h5dump)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import KERNEL_TRACKERS, debian_tool
from mpijobs import demo, launch, reference

pytestmark = pytest.mark.timeout(600)
EXPORT_JOB = """
import sys, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD; r, n = comm.rank, comm.size
heap = hpcckpt.open("j", comm, root=sys.argv[1], capacity="64MiB", export_dir=sys.argv[2])
G = (37, 5)
rows = np.array_split(np.arange(G[0]), n)[r]
off, nb = int(rows[0]), len(rows)
u = heap.array("u", (nb + 2, G[1] + 2), "f8", global_shape=G, offset=(off, 0), halo=(1, 1))
u[...] = -1.0                                   # ghosts: edge ones exported (state), interior ones refilled
u[1:-1, 1:-1] = np.arange(off * G[1], (off + nb) * G[1]).reshape(nb, G[1])
cells = heap.pool("cells", [("x", "f8"), ("id", "i8")], 3 + r, global_count=sum(3 + k for k in range(n)),
                  offset=sum(3 + k for k in range(r)))
cells.put(np.arange(3 + r), [(0.5 * i, 10 * r + i) for i in range(3 + r)])
params = heap.array("params", (2,), "f4", replicated=True); params[:] = [1.5, 2.5]
mine = heap.array("mine", (4,), "i2"); mine[:] = r
heap.checkpoint(step=1)
u[1:-1, 1:-1] += 1000.0                          # working data, never committed: never exported
print("exported", heap.export().path, flush=True)
heap.close()
"""


def run_job(n: int, code: str, *args: str) -> subprocess.CompletedProcess:
    return launch(["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(code), *args], timeout=300)


@pytest.fixture(scope="session")
def h5dump() -> str:
    """h5dump from Debian's hdf5-tools."""
    return debian_tool("h5dump", "hdf5-tools")


@pytest.fixture
def dirs(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    return os.path.join(heap_dir, "heaps"), exports


def read_master(master: str) -> dict:
    """Read every dataset of a master file in a separate process: {name: array}."""
    code = """
import sys, h5py, numpy as np, pickle
out = {}
def walk(group, prefix):
    for k in group:                       # follows external links, unlike visititems
        v = group[k]
        if isinstance(v, h5py.Group):
            walk(v, prefix + k + "/")
        else:
            out[prefix + k] = v[()]
with h5py.File(sys.argv[1], "r") as f:
    walk(f, "")
sys.stdout.buffer.write(pickle.dumps(out))
"""
    import pickle

    proc = subprocess.run([sys.executable, "-c", code, master], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return pickle.loads(proc.stdout)


@pytest.mark.parametrize("n", [2, 4])
def test_master_reads_as_the_global_arrays_assembled_by_hand(dirs, n, h5dump):
    heaps, exports = dirs
    proc = run_job(n, EXPORT_JOB, heaps, exports)
    assert proc.returncode == 0, proc.stderr
    master = os.path.join(exports, "j", "e1.h5")
    data = read_master(master)
    assert np.array_equal(data["u"], np.arange(37 * 5, dtype="f8").reshape(37, 5))
    ids = np.concatenate([10 * r + np.arange(3 + r) for r in range(n)])
    assert data["cells"]["id"].tolist() == ids.tolist()
    assert data["cells"]["x"].tolist() == [0.5 * i for r in range(n) for i in range(3 + r)]
    assert data["params"].tolist() == [1.5, 2.5]
    assert all(data[f"rank{r}/mine"].tolist() == [r] * 4 for r in range(n))
    with open(os.path.join(exports, "j", "LATEST")) as f:
        assert json.load(f)["epoch"] == 1
    manifest = json.load(open(os.path.join(exports, "j", "e1.json")))
    assert manifest["world_size"] == n and manifest["meta"] == {"step": 1}
    assert [b["rank"] for b in manifest["objects"]["u"]["blocks"]] == list(range(n))
    dump = subprocess.run([h5dump, "-d", "/u", "-s", "36,0", "-c", "1,5", master], capture_output=True,
                          text=True, timeout=60)
    assert dump.returncode == 0 and "(36,0): 180, 181, 182, 183, 184" in dump.stdout, dump.stdout + dump.stderr


def test_moved_export_directory_still_reads_and_restores(dirs):
    heaps, exports = dirs
    assert run_job(2, EXPORT_JOB, heaps, exports).returncode == 0
    moved = exports + "-moved"
    os.rename(exports, moved)
    assert read_master(os.path.join(moved, "j", "e1.h5"))["u"][36].tolist() == [180, 181, 182, 183, 184]
    shutil.rmtree(heaps)
    proc = run_job(2, RESTORE_CHECK, heaps, moved)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1", "export:1"]


RESTORE_CHECK = """
import os, sys, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
heap = hpcckpt.open("j", comm, root=sys.argv[1], capacity="64MiB", export_dir=sys.argv[2],
                    tracker=os.environ.get("TRACKER", "auto"))
u = heap["u"]
(g, off) = heap.layout("u")
inner = u[1:-1, 1:-1]
want = np.arange(37 * 5, dtype="f8").reshape(37, 5)[off[0]:off[0] + inner.shape[0]]
assert g == (37, 5) and np.array_equal(inner, want), (inner, want)
ext = np.full((39, 7), -1.0)                                 # ghosts on the global edge: as exported (-1)
ext[1:-1, 1:-1] = np.arange(37 * 5, dtype="f8").reshape(37, 5)  # interior ghosts: the neighbours' rows
assert np.array_equal(u, ext[off[0]:off[0] + u.shape[0]]), u
assert heap["params"].tolist() == [1.5, 2.5] and heap.meta == {"step": 1}
done = comm.gather(f"{heap.restored_from}:{heap.epoch}")
heap.close()
if comm.rank == 0:
    print(*done, flush=True)
"""


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS + ["page", "hash"])
def test_restore_from_export_works_under_every_tracker(dirs, tracker):
    heaps, exports = dirs
    assert run_job(2, EXPORT_JOB, heaps, exports).returncode == 0
    shutil.rmtree(heaps)
    proc = launch(["mpiexec", "-n", "2", sys.executable, "-c", textwrap.dedent(RESTORE_CHECK), heaps, exports],
                  env={"TRACKER": tracker}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export:1", "export:1"]


def test_rank_private_objects_refuse_another_rank_count_by_name(dirs):
    heaps, exports = dirs
    assert run_job(2, EXPORT_JOB, heaps, exports).returncode == 0
    shutil.rmtree(heaps)
    proc = run_job(3, RESTORE_CHECK, heaps, exports)
    assert proc.returncode != 0 and "rank-private objects ['mine']" in proc.stderr


@pytest.mark.parametrize("first,then", [(4, 2), (2, 3)])
def test_demo_restarts_from_export_on_another_rank_count(heap_dir, first, then):
    exports = os.path.join(heap_dir, "exports")
    proc, _ = demo(first, heap_dir, "--steps", "20", "--export-dir", exports, "--export-every", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(os.path.join(exports, "t"))) == ["LATEST", "e2", "e2.h5", "e2.json", "e4", "e4.h5",
                                                              "e4.json"]
    shutil.rmtree(os.path.join(heap_dir, "t"))         # the heaps are lost with their node
    proc, line = demo(then, heap_dir, "--export-dir", exports)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 4 at step 20 (export level)" in proc.stdout
    assert line == reference(then, heap_dir)


def test_one_lost_heap_restarts_every_rank_from_the_export(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert demo(2, heap_dir, "--steps", "15", "--export-dir", exports, "--export-every", "1")[0].returncode == 0
    os.unlink(os.path.join(heap_dir, "t", "rank1.heap"))
    proc, line = demo(2, heap_dir, "--export-dir", exports)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 3 at step 15 (export level)" in proc.stdout
    assert line == reference(2, heap_dir)


def test_intact_local_heaps_are_preferred_to_the_export(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert demo(2, heap_dir, "--steps", "15", "--export-dir", exports, "--export-every", "2")[0].returncode == 0
    proc, line = demo(2, heap_dir, "--export-dir", exports)
    assert "resumed from epoch 3 at step 15 (local level)" in proc.stdout
    assert line == reference(2, heap_dir)


def test_rank_killed_mid_export_leaves_latest_on_the_previous_export(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    env = {"HPCCKPT_CRASH_AT": "mid-export@4:1"}
    proc, _ = demo(2, heap_dir, "--steps", "20", "--export-dir", exports, "--export-every", "2", env=env)
    assert proc.returncode != 0
    job = os.path.join(exports, "t")
    assert json.load(open(os.path.join(job, "LATEST")))["epoch"] == 2
    assert not os.path.exists(os.path.join(job, "e4.json"))
    shutil.rmtree(os.path.join(heap_dir, "t"))
    proc, line = demo(2, heap_dir, "--export-dir", exports)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 2 at step 10 (export level)" in proc.stdout
    assert not os.path.exists(os.path.join(job, "e4")), "the half-written export was not removed"
    assert line == reference(2, heap_dir)


def _flip_data_byte(path: str) -> None:
    """Flip a byte inside the dataset 'u' of a rank file (found by h5py, changed with plain I/O)."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f["u"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        b = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([b[0] ^ 0x10]))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip_data_byte, _truncate, os.unlink], ids=["flipped", "truncated", "missing"])
def test_damaged_rank_file_falls_back_to_the_previous_export_naming_the_file(heap_dir, damage):
    exports = os.path.join(heap_dir, "exports")
    assert demo(2, heap_dir, "--steps", "20", "--export-dir", exports, "--export-every", "2")[0].returncode == 0
    bad = os.path.join(exports, "t", "e4", "rank1.h5")
    damage(bad)
    shutil.rmtree(os.path.join(heap_dir, "t"))
    proc, line = demo(2, heap_dir, "--export-dir", exports)
    assert proc.returncode == 0, proc.stderr
    assert bad in proc.stderr and "export of epoch 4 is unusable" in proc.stderr
    assert "resumed from epoch 2 at step 10 (export level)" in proc.stdout
    assert line == reference(2, heap_dir)


def test_exports_without_latest_are_never_used_nor_deleted_and_the_job_does_not_start_fresh(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert demo(2, heap_dir, "--steps", "20", "--export-dir", exports, "--export-every", "2")[0].returncode == 0
    os.unlink(os.path.join(exports, "t", "LATEST"))
    shutil.rmtree(os.path.join(heap_dir, "t"))
    before = sorted(os.listdir(os.path.join(exports, "t")))
    proc, line = demo(2, heap_dir, "--export-dir", exports)
    assert proc.returncode != 0 and line is None
    assert "started fresh" not in proc.stdout
    assert "no LATEST marker" in proc.stderr and os.path.join(exports, "t") in proc.stderr and "fresh=True" in proc.stderr
    assert sorted(os.listdir(os.path.join(exports, "t"))) == before


TILING = """
import sys, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
heap = hpcckpt.open("tile", comm, root=sys.argv[1], capacity="16MiB")
offset = {"overlap": [0, 3, 8], "hole": [0, 4, 9]}[sys.argv[2]][comm.rank]
heap.array("u", (4,), global_shape=(12 if sys.argv[2] == "overlap" else 13,), offset=(offset,))
try:
    heap.checkpoint()
    said = "committed"
except hpcckpt.CheckpointError as e:
    said = f"refused {e}"
said = comm.gather(said)
if comm.rank == 0:
    print(*said, sep=chr(10), flush=True)
"""


@pytest.mark.parametrize("case,words", [("overlap", "rank 0 (offset [0], shape [4]) and rank 1 (offset [3]"),
                                         ("hole", "cover 12 of the 13 elements")])
def test_blocks_that_overlap_or_leave_holes_are_refused_naming_object_and_ranks(heap_dir, case, words):
    proc = run_job(3, TILING, heap_dir, case)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused") and "'u'" in line and words in line for line in lines)


def hpcckpt_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_offline_export_info_verify_and_restore_for_another_rank_count(heap_dir):
    assert demo(2, heap_dir, "--steps", "20")[0].returncode == 0
    exports, root = os.path.join(heap_dir, "x"), os.path.join(heap_dir, "r")
    proc = hpcckpt_cli("export", os.path.join(heap_dir, "t"), "--to", exports, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epoch"] == 4
    info = json.loads(hpcckpt_cli("info", os.path.join(exports, "t"), "--json").stdout)
    assert info[0]["meta"] == {"step": 20} and info[0]["objects"]["u"]["shape"] == [96, 64]
    verify = hpcckpt_cli("verify", os.path.join(exports, "t", "e4.h5"))
    assert verify.returncode == 0 and "ok, epoch 4" in verify.stdout
    proc = hpcckpt_cli("restore", os.path.join(exports, "t"), "--to", root, "-n", "3", "--capacity", "64MiB")
    assert proc.returncode == 0, proc.stderr
    proc, line = demo(3, root)
    assert "resumed from epoch 4 at step 20 (local level)" in proc.stdout
    assert line == reference(3, heap_dir)


def test_verify_of_a_damaged_export_names_the_file_and_fails(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert demo(2, heap_dir, "--steps", "10", "--export-dir", exports, "--export-every", "2")[0].returncode == 0
    bad = os.path.join(exports, "t", "e2", "rank0.h5")
    _flip_data_byte(bad)
    proc = hpcckpt_cli("verify", os.path.join(exports, "t"))
    assert proc.returncode == 1 and bad in proc.stderr and "checksum" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_export_of_a_missing_job_says_so_in_one_line(heap_dir):
    proc = hpcckpt_cli("export", os.path.join(heap_dir, "nothing"), "--to", heap_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
