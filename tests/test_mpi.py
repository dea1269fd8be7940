"""MPI: coordinated checkpoints, rank failures at every point of the protocol, and restarts.

Every job runs under the real mpiexec (the mpich wheel) at 2 and 4 ranks, through the
relauncher, with a timeout: a hang fails the test, it does not stall CI.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import textwrap

import pytest
from mpijobs import demo, launch, reference

pytestmark = pytest.mark.timeout(600)
SIZES = [2, 4]


@pytest.mark.parametrize("n", SIZES)
def test_checkpointed_run_gives_the_failure_free_answer(heap_dir, n):
    proc, line = demo(n, heap_dir)
    assert proc.returncode == 0, proc.stderr
    assert line == reference(n, heap_dir)
    assert sorted(os.listdir(os.path.join(heap_dir, "t"))) == [f"rank{r}.heap" for r in range(n)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("point", ["before-copy", "mid-copy", "after-copy", "after-prepare", "after-allreduce"])
def test_restart_after_rank_killed_at_each_point_of_the_protocol(heap_dir, n, point):
    proc, line = demo(n, heap_dir, restarts=2, env={"HPCCKPT_CRASH_AT": f"{point}@3:{n - 1}"})
    assert proc.returncode == 0, proc.stderr
    assert "attempt 1/3 exited" in proc.stderr and "attempt 2/3 succeeded" in proc.stderr
    assert line == reference(n, heap_dir)


@pytest.mark.parametrize("n", SIZES)
def test_restart_after_rank_killed_at_a_random_step(heap_dir, n):
    step = int(hashlib.sha256(f"{n}".encode()).hexdigest(), 16) % 28 + 1
    proc, line = demo(n, heap_dir, "--kill-rank", "1", "--kill-at-step", str(step), restarts=2)
    assert proc.returncode == 0, proc.stderr
    assert "attempt 2/3 succeeded" in proc.stderr
    assert line == reference(n, heap_dir)


def test_two_ranks_die_in_the_same_run(heap_dir):
    proc, line = demo(4, heap_dir, restarts=2, env={"HPCCKPT_CRASH_AT": "mid-copy@2:1,3"})
    assert proc.returncode == 0 and "attempt 2/3 succeeded" in proc.stderr, proc.stderr
    assert line == reference(4, heap_dir)


def test_a_rank_dies_during_the_restore_of_the_restart(heap_dir):
    env = {"HPCCKPT_CRASH_AT": "mid-restore:2", "HPCCKPT_CRASH_ATTEMPT": "2"}
    proc, line = demo(4, heap_dir, "--kill-rank", "0", "--kill-at-step", "17", restarts=3, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "attempt 2/4 exited" in proc.stderr and "attempt 3/4 succeeded" in proc.stderr
    assert line == reference(4, heap_dir)


def test_heap_from_another_world_size_is_refused(heap_dir):
    assert demo(4, heap_dir)[0].returncode == 0
    before = {p: _digest(p) for p in glob.glob(os.path.join(heap_dir, "t", "*.heap"))}
    proc, line = demo(2, heap_dir)
    assert proc.returncode != 0 and line is None
    assert "belongs to job 't', rank 0 of 4, not job 't', rank 0 of 2" in proc.stderr
    assert before == {p: _digest(p) for p in before}


def test_heap_of_another_job_name_is_refused(heap_dir):
    assert demo(2, heap_dir, name="alpha")[0].returncode == 0
    os.rename(os.path.join(heap_dir, "alpha"), os.path.join(heap_dir, "beta"))
    proc, _ = demo(2, heap_dir, name="beta")
    assert proc.returncode != 0 and "belongs to job 'alpha'" in proc.stderr


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_missing_heap_on_one_rank_is_refused_and_nothing_is_overwritten(heap_dir):
    assert demo(2, heap_dir)[0].returncode == 0
    kept = os.path.join(heap_dir, "t", "rank0.heap")
    digest = _digest(kept)
    os.unlink(os.path.join(heap_dir, "t", "rank1.heap"))
    proc, _ = demo(2, heap_dir)
    assert proc.returncode != 0 and "rank(s) [1] have no heap" in proc.stderr
    assert _digest(kept) == digest and not os.path.exists(os.path.join(heap_dir, "t", "rank1.heap"))


FAILING_CHECKPOINT = """
import sys, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
heap = hpcckpt.open("f", comm=comm, root=sys.argv[1], capacity="4MiB")
a = heap.array("a", 100)
a[:] = 1
assert heap.checkpoint(step=1) == 1
a[:] = 2
try:   # only the last rank's metadata is too large: its prepare fails
    heap.checkpoint(blob="x" * (4000 if comm.rank == comm.size - 1 else 1))
except hpcckpt.CheckpointError as e:
    assert f"failed on rank(s) {comm.size - 1}" in str(e) and "withdrawn" in str(e), e
else:
    raise SystemExit("the failed checkpoint was not reported on rank %d" % comm.rank)
assert heap.epoch == 1 and heap.meta == {"step": 1}
assert heap.checkpoint(step=2) == 2 and heap.stats["total"]["objects_dirty"] == comm.size
heap.close()
done = comm.gather(comm.rank)
if comm.rank == 0:
    print("ok", *done)
"""


@pytest.mark.parametrize("n", SIZES)
def test_a_checkpoint_failing_on_one_rank_raises_on_every_rank_and_is_withdrawn(heap_dir, n):
    script = os.path.join(heap_dir, "job.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(FAILING_CHECKPOINT))
    proc = launch([sys.executable, "-m", "hpcckpt", "run", "-n", str(n), "--max-restarts", "0", "--",
                   sys.executable, script, heap_dir])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", *map(str, range(n))]


OPEN_ONLY = """
import sys, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
try:
    heap = hpcckpt.open(sys.argv[2], comm, root=sys.argv[1], capacity="4MiB")
except hpcckpt.OwnerMismatchError as e:
    said = "owner"
except ValueError as e:
    said = "name"
except hpcckpt.HeapError as e:
    said = "refused" + (":fresh" if "fresh=True" in str(e) and sys.argv[1] in str(e) else "")
else:
    said = f"{heap.restored_from}:{heap.epoch}"
    heap.close()
said = comm.gather(said)
if comm.rank == 0:
    print(*said)
"""


def open_only(n: int, root: str, name: str) -> list[str]:
    proc = launch(["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(OPEN_ONLY), root, name])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_a_rank_killed_while_the_heaps_are_created_starts_the_job_afresh(heap_dir):
    assert open_only(2, heap_dir, "j") == ["None:None", "None:None"]
    path = os.path.join(heap_dir, "j", "rank1.heap")
    os.rename(path, path + ".new999999999")   # rank 1 died before linking its new heap into place
    assert open_only(2, heap_dir, "j") == ["None:None", "None:None"]
    assert sorted(os.listdir(os.path.join(heap_dir, "j"))) == ["rank0.heap", "rank1.heap"]


@pytest.mark.parametrize("left", [b"", bytes(100), bytes(8192), b"not a heap"])
def test_a_file_named_like_a_heap_that_is_not_one_stops_the_job_and_is_kept(heap_dir, left):
    assert open_only(2, heap_dir, "j") == ["None:None", "None:None"]
    path = os.path.join(heap_dir, "j", "rank1.heap")
    with open(path, "wb") as f:
        f.write(left)
    assert open_only(2, heap_dir, "j") == ["refused:fresh", "refused:fresh"]
    with open(path, "rb") as f:
        assert f.read() == left                              # never deleted for it


@pytest.mark.parametrize("damage", ["zero superblocks", "truncate"])
def test_every_heap_damaged_and_no_export_is_an_error_not_a_fresh_start(heap_dir, damage):
    code = OPEN_ONLY.replace('heap.close()', 'heap.array("u", 8)[:] = 1; heap.checkpoint(step=1); heap.close()')
    proc = launch(["mpiexec", "-n", "2", sys.executable, "-c", textwrap.dedent(code), heap_dir, "j"])
    assert proc.returncode == 0, proc.stderr
    sizes = {}
    for r in range(2):
        path = os.path.join(heap_dir, "j", f"rank{r}.heap")
        with open(path, "r+b") as f:
            if damage == "truncate":
                f.truncate(0)
            else:
                for page in (0, 5):                      # the superblock and its twin
                    f.seek(page * 4096)
                    f.write(bytes(4096))
        sizes[path] = os.path.getsize(path)
    assert open_only(2, heap_dir, "j") == ["refused:fresh", "refused:fresh"]
    assert {p: os.path.getsize(p) for p in sizes} == sizes     # nothing deleted or rewritten


def test_owner_mismatch_arrives_as_its_own_class_on_every_rank(heap_dir):
    assert open_only(2, heap_dir, "j") == ["None:None", "None:None"]
    assert open_only(3, heap_dir, "j") == ["owner"] * 3


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "x" * 64])
def test_job_names_that_escape_the_root_or_cannot_reopen_are_refused(heap_dir, name):
    assert open_only(2, heap_dir, name) == ["name", "name"]


INTERRUPTED = """
import sys, hpcckpt, hpcckpt.mpi as coordination
from mpi4py import MPI
comm = MPI.COMM_WORLD
heap = hpcckpt.open("k", comm, root=sys.argv[1], capacity="4MiB")
heap.array("a", 10)[:] = 1
heap.checkpoint(step=1)
if comm.rank == 1:   # Ctrl-C lands on rank 1 while it prepares
    real = coordination._call
    def interrupted(fn, *args):
        if fn == heap._native.prepare:
            raise KeyboardInterrupt
        return real(fn, *args)
    coordination._call = interrupted
try:
    heap.checkpoint(step=2)
    said = "committed"
except KeyboardInterrupt:
    said = "interrupted"
except hpcckpt.CheckpointError as e:
    said = "failed" if "rank(s) 1" in str(e) else str(e)
said = comm.gather((said, heap.epoch))
if comm.rank == 0:
    print(*(f"{s}:{e}" for s, e in said))
"""


@pytest.mark.parametrize("n", SIZES)
def test_keyboard_interrupt_on_one_rank_before_the_vote_fails_every_rank_and_none_hangs(heap_dir, n):
    proc = launch(["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(INTERRUPTED), heap_dir],
                  timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["failed:1", "interrupted:1"] + ["failed:1"] * (n - 2)
