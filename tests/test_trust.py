"""Trust in the restart: a failed restore from an export, or a refused open, loses nothing and
leaves nothing behind.  Under the real mpiexec, through the application of test_hang."""
from __future__ import annotations

import hashlib
import os
import sys

import pytest
from mpijobs import launch
from test_hang import answer, expected, run_app

pytestmark = pytest.mark.timeout(600)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_restore_from_exports_that_all_fail_puts_the_local_heaps_back(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert run_app(heap_dir, 2, steps=4, env={"EXPORTS": exports}).returncode == 0
    job = os.path.join(heap_dir, "heaps", "app")
    assert launch([sys.executable, "-m", "hpcckpt", "export", job, "--to", exports]).returncode == 0
    kept = os.path.join(job, "rank0.heap")
    os.unlink(os.path.join(job, "rank1.heap"))          # rank 1's node is gone: the export must serve
    for entry in os.listdir(os.path.join(exports, "app", "e2")):
        with open(os.path.join(exports, "app", "e2", entry), "r+b") as f:
            f.truncate(100)                             # and the export is damaged
    before = digest(kept)
    proc = run_app(heap_dir, 2, steps=6, env={"EXPORTS": exports})
    assert proc.returncode != 0 and "no export can be restored" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(job)) == ["rank0.heap"] and digest(kept) == before   # rank 0's heap as it was


def test_a_restore_killed_after_setting_the_heap_aside_resumes_from_the_local_level(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert run_app(heap_dir, 2, steps=4, env={"EXPORTS": exports}).returncode == 0
    job = os.path.join(heap_dir, "heaps", "app")
    for r in range(2):                                  # as a killed restore leaves it: set aside, new heap empty
        os.rename(os.path.join(job, f"rank{r}.heap"), os.path.join(job, f"rank{r}.heap.aside"))
    proc = run_app(heap_dir, 2, steps=8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumes job 'app' at epoch 2 (step 4) from the local level" in proc.stderr
    assert answer(proc) == expected(2, 8)
    assert sorted(os.listdir(job)) == ["rank0.heap", "rank1.heap"]


def test_fresh_true_starts_afresh_and_moves_the_old_exports_aside(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert run_app(heap_dir, 2, steps=8, env={"EXPORTS": exports}).returncode == 0
    job = os.path.join(heap_dir, "heaps", "app")
    assert launch([sys.executable, "-m", "hpcckpt", "export", job, "--to", exports]).returncode == 0
    old = sorted(os.listdir(os.path.join(exports, "app")))
    with open(os.path.join(exports, "app", "LATEST"), "w") as f:
        f.write("garbage")                               # with the local heaps gone, the job refuses to start
    for entry in os.listdir(job):
        os.unlink(os.path.join(job, entry))
    refused = run_app(heap_dir, 2, steps=8, env={"EXPORTS": exports})
    assert refused.returncode != 0 and "fresh=True" in refused.stderr
    proc = run_app(heap_dir, 2, steps=8, env={"EXPORTS": exports, "FRESH": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert answer(proc) == expected(2, 8) and "starts afresh (fresh=True)" in proc.stderr
    aside = [d for d in os.listdir(exports) if d.startswith("app.before-fresh-")]
    assert len(aside) == 1 and sorted(os.listdir(os.path.join(exports, aside[0]))) == old


def test_latest_only_moves_forward(tmp_path):
    from hpcckpt.manifest import read_latest, write_latest
    assert write_latest(str(tmp_path), 7) and read_latest(str(tmp_path)) == 7
    assert not write_latest(str(tmp_path), 3) and read_latest(str(tmp_path)) == 7
    assert write_latest(str(tmp_path), 9) and read_latest(str(tmp_path)) == 9
    assert sorted(os.listdir(tmp_path)) == ["LATEST"]    # no temporary file left


TILING_KILLED = """
import os, sys, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD; r = comm.rank
heap = hpcckpt.open("tile", comm, root=sys.argv[1], capacity="16MiB")
u = heap.array("u", (4,), global_shape=(8,), offset=(4 * r,))
if heap.epoch is None:
    u[:] = r + 1
    heap.checkpoint(step=1)
    u[:] = 100
    bad = heap.array("bad", (4,), global_shape=(8,), offset=(0,))   # every rank claims the same block
    os.environ["HPCCKPT_CRASH_AT"] = "after-allreduce@2"   # the job dies after the vote, before the withdraw
    heap.checkpoint(step=2)
said = comm.gather(f"resumed {r} {heap.epoch} {heap.meta} {'bad' in heap} {u.tolist()}")
if r == 0:
    print(*said, sep=chr(10), flush=True)
heap.close()
"""


def test_a_job_killed_between_the_vote_and_the_withdraw_of_a_refused_tiling_never_restores_that_epoch(heap_dir):
    script = os.path.join(heap_dir, "tile.py")
    with open(script, "w") as f:
        f.write(TILING_KILLED)
    first = launch(["mpiexec", "-n", "2", sys.executable, script, heap_dir])
    assert first.returncode != 0 and "resumed" not in first.stdout
    again = launch(["mpiexec", "-n", "2", sys.executable, script, heap_dir])
    assert again.returncode == 0, again.stderr[-2000:]
    lines = sorted(line for line in again.stdout.splitlines() if line.startswith("resumed"))
    assert lines == ["resumed 0 1 {'step': 1} False [1.0, 1.0, 1.0, 1.0]",
                     "resumed 1 1 {'step': 1} False [2.0, 2.0, 2.0, 2.0]"]


HELPER_LIVES = """
import os, signal, sys, threading, warnings, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
got = []
opener = threading.Thread(target=lambda: got.append(hpcckpt.open("bg", comm, root=sys.argv[1], capacity="16MiB",
                                                                  export_dir=sys.argv[2])))
opener.start(); opener.join()                    # the thread that opened the heap (and started the helper) ends
heap = got[0]
u = heap.array("u", (4,), global_shape=(4 * comm.size,), offset=(4 * comm.rank,))
u[:] = comm.rank
heap.checkpoint(step=1)
first = heap.export().path
os.kill(heap.exporter.helper.proc.pid, signal.SIGKILL)   # as the OOM killer would
heap.exporter.helper.proc.wait()
u[:] += 10
heap.checkpoint(step=2)
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    second = heap.export().path
heap.close()
line = " ".join(map(str, [comm.rank, os.path.basename(first), os.path.basename(second),
                          any("helper of rank" in str(w.message) and "new one" in str(w.message) for w in said)]))
lines = comm.gather(line)
if comm.rank == 0:
    print(*lines, sep=chr(10), flush=True)
"""


def test_exports_survive_the_opening_thread_ending_and_a_killed_helper(heap_dir):
    proc = launch(["mpiexec", "-n", "2", sys.executable, "-c", HELPER_LIVES, os.path.join(heap_dir, "heaps"),
                   os.path.join(heap_dir, "exports")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["0 e1.h5 e2.h5 True", "1 e1.h5 e2.h5 True"]


def test_a_master_without_its_rank_files_reads_as_nan_and_says_to_verify(heap_dir):
    import shutil

    import h5py
    import numpy as np
    exports = os.path.join(heap_dir, "exports")
    assert run_app(heap_dir, 2, steps=4, env={"EXPORTS": exports}).returncode == 0
    assert launch([sys.executable, "-m", "hpcckpt", "export", os.path.join(heap_dir, "heaps", "app"),
                   "--to", exports]).returncode == 0
    with h5py.File(os.path.join(exports, "app", "e2.h5")) as f:
        assert np.isfinite(f["u"][...]).all()                  # with its rank files: the data
    alone = os.path.join(heap_dir, "alone")
    os.mkdir(alone)
    shutil.copy(os.path.join(exports, "app", "e2.h5"), alone)  # copied without its e2/ directory
    with h5py.File(os.path.join(alone, "e2.h5")) as f:
        assert np.isnan(f["u"][...]).all()                     # missing data shows, it is not zeros
        assert f.attrs["hpcckpt_epoch"] == 2 and f.attrs["hpcckpt_step"] == 4
        assert "hpcckpt verify" in f.attrs["hpcckpt_note"]


def modes(top: str) -> dict[str, int]:
    import stat
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            out[os.path.relpath(os.path.join(d, n), top)] = stat.S_IMODE(os.lstat(os.path.join(d, n)).st_mode)
    return out


def test_exports_are_private_unless_asked_and_a_foreign_export_directory_is_refused(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert run_app(heap_dir, 2, steps=4, env={"EXPORTS": exports}).returncode == 0
    job = os.path.join(heap_dir, "heaps", "app")
    assert launch([sys.executable, "-m", "hpcckpt", "export", job, "--to", exports]).returncode == 0
    found = modes(os.path.join(exports, "app"))
    assert found and all(m == (0o700 if os.path.isdir(os.path.join(exports, "app", p)) else 0o600)
                         for p, m in found.items()), found
    shared = os.path.join(heap_dir, "shared")
    assert launch([sys.executable, "-m", "hpcckpt", "export", job, "--to", shared, "--mode", "640"]).returncode == 0
    assert set(modes(os.path.join(shared, "app")).values()) == {0o640, 0o750}
    os.chmod(os.path.join(exports, "app"), 0o777)            # writable by every user: not trusted
    for entry in os.listdir(job):
        os.unlink(os.path.join(job, entry))
    proc = run_app(heap_dir, 2, steps=6, env={"EXPORTS": exports})
    assert proc.returncode != 0 and "writable by every user" in proc.stderr, proc.stderr[-2000:]
