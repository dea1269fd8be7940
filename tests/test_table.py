"""Tables whose length changes: numpy semantics, what a checkpoint copies under every tracker,
crash consistency of rows and length, bad input, and distributed tables exported and restored
(routed) under the real mpiexec at several rank counts."""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
from conftest import ALL_TRACKERS
from mpijobs import launch

import hpcckpt
from hpcckpt.table import TableError

pytestmark = pytest.mark.timeout(600)
ROW = np.dtype([("x", "f8"), ("v", "f8"), ("id", "i8"), ("pad", "V40")])   # 64 B


def records(ids) -> np.ndarray:
    ids = np.asarray(ids)
    out = np.zeros(ids.size, ROW)
    out["x"], out["v"], out["id"] = ids * 0.5, -ids, ids
    return out


def test_rows_follow_a_numpy_model_through_random_changes_and_reopens(heap_path):
    rng = np.random.default_rng(7)
    heap = hpcckpt.Heap.create(heap_path, "64MiB")
    t = heap.table("p", ROW)
    model = records([])
    next_id = 0
    for step in range(60):
        op = rng.integers(0, 5)
        n = len(model)
        if op == 0 or n < 5:
            k = int(rng.integers(1, 400))
            new = records(np.arange(next_id, next_id + k))
            next_id += k
            t.append(new)
            model = np.concatenate([model, new])
        elif op == 1:
            idx = rng.choice(n, int(rng.integers(1, n // 3 + 2)), replace=False)
            t.remove(idx)
            keep_len = n - idx.size
            holes = np.sort(idx[idx < keep_len])
            movers = np.setdiff1d(np.arange(keep_len, n), idx)
            model[holes] = model[movers]
            model = model[:keep_len]
        elif op == 2:
            mask = rng.random(n) < 0.7
            t.keep(mask)
            model = model[mask]
        elif op == 3:
            m = int(rng.integers(0, n + 50))
            t.resize(m)
            model = np.concatenate([model[:m], np.zeros(max(0, m - n), ROW)])
        else:
            w = rng.choice(n, max(1, n // 10), replace=False)
            t.rows["x"][w] += 1.0
            model["x"][w] += 1.0
        assert len(t) == len(model) and np.array_equal(t.rows, model), f"step {step} op {op}"
        if step % 7 == 0:
            heap.checkpoint(step=step)
        if step % 20 == 19:
            heap.close()
            heap = hpcckpt.Heap.open(heap_path)
            t = heap["p"]
            assert np.array_equal(t.rows, model)
    heap.close()


@pytest.mark.parametrize("tracker", ALL_TRACKERS)
def test_a_checkpoint_copies_the_rows_appended_or_written_and_the_length(heap_path, tracker):
    """1 % removed, 1 % appended, 1 % written in 64 B rows: the checkpoint copies the rows that
    changed place or value (holes refilled, tail appended, rows written) and the header unit."""
    n, k = 50_000, 500
    heap = hpcckpt.Heap.create(heap_path, "128MiB", tracker=tracker)
    t = heap.table("p", ROW, capacity=n + k)
    t.append(records(np.arange(n)))
    heap.checkpoint(step=0)
    rng = np.random.default_rng(1)
    for step in range(3):
        t.remove(rng.choice(len(t), k, replace=False))
        t.append(records(np.arange(k) + 10**6 * (step + 1)))
        t.rows["x"][rng.choice(len(t), k, replace=False)] += 1.0
        heap.checkpoint(step=step + 1)
        changed = 3 * k * ROW.itemsize
        assert heap.stats["bytes_copied"] <= 1.2 * changed, (tracker, heap.stats["bytes_copied"], changed)
        assert heap.stats["bytes_copied"] >= 0.8 * changed
    heap.close()


def test_growth_is_geometric_and_keeps_every_row(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "64MiB")
    t = heap.table("ids", "i8")
    caps = set()
    for i in range(2000):
        t.append(i)
        caps.add(t.capacity)
    assert t.rows.tolist() == list(range(2000))
    assert len(caps) <= 4, caps                   # 503, 1015, 2039: doublings, not one per append
    heap.checkpoint(step=1)
    heap.close()
    with hpcckpt.Heap.open(heap_path) as heap:
        assert heap["ids"].rows.tolist() == list(range(2000))


KILLED = """
import os, sys, numpy as np, hpcckpt
path, phase = sys.argv[1], sys.argv[2]
heap = hpcckpt.Heap.create(path, "64MiB", tracker=sys.argv[3])
t = heap.table("p", "i8")
t.append(np.arange(100)); heap.checkpoint(step=1)           # epoch 1: 100 rows
t.remove(np.arange(0, 100, 3)); t.append(np.arange(1000, 3000)); t.rows[:5] = -1   # grows
if phase == "between":
    print("ready", flush=True); os.kill(os.getpid(), 9)
heap.checkpoint(step=2)                                      # killed inside, by HPCCKPT_CRASH_AT
print("survived", flush=True)
"""


def _expected(epoch: int) -> list[int]:
    a = np.arange(100)
    if epoch == 1:
        return a.tolist()
    idx = np.arange(0, 100, 3)
    keep_len = 100 - idx.size
    holes, movers = idx[idx < keep_len], np.setdiff1d(np.arange(keep_len, 100), idx)
    a[holes] = a[movers]
    a = np.concatenate([a[:keep_len], np.arange(1000, 3000)])
    a[:5] = -1
    return a.tolist()


@pytest.mark.parametrize("tracker", ["auto", "mprotect", "hash"])
@pytest.mark.parametrize("point", ["between", "before-copy", "mid-copy", "after-copy", "after-prepare"])
def test_a_kill_at_any_point_restores_rows_and_length_as_committed(heap_path, tracker, point):
    env = {} if point == "between" else {"HPCCKPT_CRASH_AT": f"{point}@2"}
    proc = launch([sys.executable, "-c", textwrap.dedent(KILLED), heap_path, point, tracker], env, timeout=120)
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr
    with hpcckpt.Heap.open(heap_path) as heap:
        want = 2 if point == "after-prepare" else 1   # one process: a prepared epoch is its own commit
        assert heap.epoch == want
        assert heap["p"].rows.tolist() == _expected(want)


def test_growth_past_the_heap_names_the_table_and_changes_nothing(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "4MiB")
    t = heap.table("particles", ROW)
    t.append(records(np.arange(20_000)))
    before = t.rows.copy()
    with pytest.raises(hpcckpt.HeapFullError, match="table 'particles' cannot grow.*unchanged \\(20000 rows\\)"):
        t.append(records(np.arange(40_000)))
    assert len(t) == 20_000 and np.array_equal(t.rows, before)
    heap.checkpoint(step=1)
    heap.close()


def test_redeclaring_with_another_dtype_says_what_is_held_and_what_was_declared(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "8MiB")
    heap.table("p", ROW).append(records([1, 2]))
    with pytest.raises(TableError, match=r"table 'p' holds rows of .*'x'.*the program declared float32"):
        heap.table("p", "f4")
    with pytest.raises(TableError, match="is not distributed; the program declared distributed=True"):
        heap.table("p", ROW, distributed=True)
    assert heap.table("p", ROW).rows["id"].tolist() == [1, 2]
    heap.close()


def test_bad_indices_and_values_leave_the_table_as_it_was(heap_path):
    heap = hpcckpt.Heap.create(heap_path, "8MiB")
    t = heap.table("t", "i4")
    t.append(np.arange(10))
    for call, arg in [(t.remove, [3, 10]), (t.keep, np.ones(9, bool)), (t.remove, [1.5]), (t.append, "abc"),
                      (t.append, np.zeros((2, 2))), (t.resize, -1)]:
        with pytest.raises(TableError, match="table 't'"):
            call(arg)
        assert t.rows.tolist() == list(range(10))
    heap.close()


# -- distributed tables under MPI ------------------------------------------------------------

JOB = """
import sys, json, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD; r, n = comm.rank, comm.size
root, exports, mode = sys.argv[1], sys.argv[2], sys.argv[3]
dt = np.dtype([("x", "f8"), ("id", "i8")])
def owner(rows):
    return np.minimum((rows["x"] * n).astype(np.int64), n - 1)
routes = {"route": owner, "none": None, "out-of-range": lambda rows: np.full(len(rows), n),
          "short": lambda rows: np.zeros(max(0, len(rows) - 1), int), "raises": lambda rows: 1 / 0,
          "all-to-0": lambda rows: np.zeros(len(rows), int)}
heap = hpcckpt.open("tab", comm, root=root, capacity="64MiB", export_dir=exports)
if mode == "write":
    t = heap.table("p", dt, distributed=True)
    k = 5 + 3 * r                                      # uneven on purpose
    x = (r + np.arange(k) / k) / n                     # rank r holds the particles of its domain
    t.append(np.rec.fromarrays([x, 1000 * r + np.arange(k)], dtype=dt))
    heap.checkpoint(step=1)
    t.append(np.rec.fromarrays([[0.0], [-1]], dtype=dt))   # never committed: never exported
    heap.export()
else:
    err = None
    try:
        t = heap.table("p", dt, distributed=True, route=routes[mode])
    except hpcckpt.HeapError as e:
        err, t = str(e), heap["p"]
    if mode == "all-to-0":                             # rank 0 grows, the others hold nothing: export that
        heap.checkpoint(step=2)
        heap.export()
    said = comm.gather({"rows": t.rows["id"].tolist(), "error": err, "from": heap.restored_from})
    if r == 0:                                        # one line: ranks' lines may interleave
        print("said", json.dumps(said), flush=True)
heap.close()
"""


def run_job(n: int, *args: str) -> dict:
    proc = launch(["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(JOB), *args], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("said ")]
    said = said[0] if said else []
    return {"rows": {r: s["rows"] for r, s in enumerate(said)}, "errors": [s["error"] for s in said if s["error"]],
            "stdout": proc.stdout}


def _written(n: int) -> list[tuple[float, int]]:
    return [((r + i / (5 + 3 * r)) / n, 1000 * r + i) for r in range(n) for i in range(5 + 3 * r)]


@pytest.fixture
def exported_at_4(heap_dir):
    heaps, exports = os.path.join(heap_dir, "heaps"), os.path.join(heap_dir, "exports")
    run_job(4, heaps, exports, "write")
    return heaps, exports


def test_a_distributed_table_exports_as_one_dataset_in_rank_order(exported_at_4):
    import h5py
    heaps, exports = exported_at_4
    with h5py.File(os.path.join(exports, "tab", "e1.h5"), "r") as f:
        got = f["p"][()]
    assert [(float(x), int(i)) for x, i in got.tolist()] == _written(4)
    m = json.load(open(os.path.join(exports, "tab", "e1.json")))
    blocks = sorted(m["objects"]["p"]["blocks"], key=lambda b: b["rank"])
    assert [b["rows"] for b in blocks] == [5, 8, 11, 14] and [b["offset"] for b in blocks] == [[0], [5], [13], [24]]


@pytest.mark.parametrize("n", [2, 3])
def test_a_restore_at_another_rank_count_routes_every_row_to_the_rank_route_names(exported_at_4, n):
    heaps, exports = exported_at_4
    shutil.rmtree(heaps)
    got = run_job(n, heaps, exports, "route")["rows"]
    for r in range(n):   # each rank: the rows of its domain, in global order
        want = [i for x, i in _written(4) if min(int(x * n), n - 1) == r]
        assert got[r] == want, (r, got[r], want)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_without_route_rows_split_evenly_and_at_the_same_count_come_back_to_their_rank(exported_at_4, n):
    heaps, exports = exported_at_4
    shutil.rmtree(heaps)
    got = run_job(n, heaps, exports, "none")["rows"]
    ids = [i for _, i in _written(4)]
    if n == 4:
        want = [[1000 * r + i for i in range(5 + 3 * r)] for r in range(4)]
    else:
        want = [part.tolist() for part in np.array_split(np.array(ids), n)]
    assert [got[r] for r in range(n)] == want


@pytest.mark.parametrize("mode, says", [("out-of-range", "route returned rank 3, outside 0..2"),
                                        ("short", "it must return one rank per row"),
                                        ("raises", "route raised ZeroDivisionError")])
def test_a_bad_route_fails_on_every_rank_naming_the_table_and_moves_nothing(exported_at_4, mode, says):
    heaps, exports = exported_at_4
    shutil.rmtree(heaps)
    out = run_job(3, heaps, exports, mode)
    assert len(out["errors"]) == 3 and all("table 'p'" in e and says in e for e in out["errors"]), out["stdout"]
    ids = [i for _, i in _written(4)]
    assert [out["rows"][r] for r in range(3)] == [p.tolist() for p in np.array_split(np.array(ids), 3)]


def test_system_calls_write_into_an_exposed_table_under_mprotect(heap_path, tmp_path):
    data = np.random.default_rng(3).integers(0, 255, 3 * 4096 + 100, dtype=np.uint8)
    src = tmp_path / "bytes"
    src.write_bytes(data.tobytes())
    heap = hpcckpt.Heap.create(heap_path, "8MiB", tracker="mprotect")
    t = heap.table("buf", "u1", capacity=data.size)
    t.resize(data.size)
    heap.checkpoint(step=1)
    heap.expose("buf")
    with open(src, "rb") as f:
        assert f.readinto(t.rows) == data.size
    heap.checkpoint(step=2)
    heap._native.abandon()                       # a crash: the reopen restores epoch 2
    with hpcckpt.Heap.open(heap_path, tracker="mprotect") as heap:
        assert np.array_equal(heap["buf"].rows, data)


def test_a_table_routed_to_one_rank_grows_there_and_exports_empty_blocks_for_the_others(exported_at_4):
    import h5py
    heaps, exports = exported_at_4
    shutil.rmtree(heaps)
    got = run_job(3, heaps, exports, "all-to-0")["rows"]
    ids = [i for _, i in _written(4)]
    assert got == {0: ids, 1: [], 2: []}
    with h5py.File(os.path.join(exports, "tab", "e2.h5"), "r") as f:
        assert f["p"]["id"].tolist() == ids
    m = json.load(open(os.path.join(exports, "tab", "e2.json")))
    assert sorted(b["rows"] for b in m["objects"]["p"]["blocks"]) == [0, 0, len(ids)]
    shutil.rmtree(heaps)
    back = run_job(2, heaps, exports, "none")["rows"]             # and back: an even split again
    assert [back[0], back[1]] == [p.tolist() for p in np.array_split(np.array(ids), 2)]


@pytest.mark.parametrize("dtype, rows", [(np.dtype(("f8", (3,))), np.arange(12.0).reshape(4, 3)),
                                         (np.dtype("S5"), np.array([b"ab", b"cdefg", b"h", b""], "S5")),
                                         (np.dtype([("p", "f4", (2,)), ("n", "u1")]),
                                          np.array([((1, 2), 3), ((4, 5), 6), ((7, 8), 9), ((0, 0), 1)],
                                                   [("p", "f4", (2,)), ("n", "u1")]))])
def test_any_dtype_a_pool_takes_round_trips_through_a_checkpoint_and_a_crash(heap_path, dtype, rows):
    heap = hpcckpt.Heap.create(heap_path, "8MiB")
    t = heap.table("t", dtype)
    t.append(rows)
    t.append(rows[0])                      # one record
    t.remove([1])
    want = t.rows.copy()
    assert t.shape == want.shape and len(t) == 4
    heap.checkpoint(step=1)
    t.append(rows)                         # after the checkpoint: lost in the crash
    heap._native.abandon()
    with hpcckpt.Heap.open(heap_path) as heap:
        assert np.array_equal(heap["t"].rows, want)
