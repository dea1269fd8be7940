"""Checkpointing a hash table against its peers: PMDK transactions and whole-table dumps.

    python benchmarks/peers.py                      # 1M records of 64 B, 0.1 / 1 / 10 % dirty per step
    python benchmarks/peers.py --records 200000 --steps 4 --repeats 2 --fractions 0.01

The table holds `--records` records of 64 B (key u8, value f8, 48 B of padding). Each step
rewrites K = fraction x records distinct records, drawn with Zipf(1.1) weights (hot records
scattered over the table by a fixed permutation, as a hash spreads keys), then takes one
checkpoint. Every method replays the same updates; its final table must equal a numpy
reference, else the run fails. Methods, each on tmpfs (/dev/shm):

- hpcckpt through ``pool.put`` + ``heap.checkpoint()``, trackers uffd and mprotect, and the pool
  declared ``writes="put"`` (no tracker watches it: "put-only");
- hpcckpt from C (peers_core.c): direct stores through ``heap_addr``, ``ckpt_prepare``/``commit``;
- PMDK (peers_pmdk.c): one transaction per step, ``pmemobj_tx_add_range`` + store per record,
  ``PMEM_IS_PMEM_FORCE=1`` (skipped with a message unless libpmemobj-dev is installed);
- whole-table dumps per step: h5py and ``np.save``, each followed by fsync.

Per method: bytes per checkpoint, checkpoint time, step time (update + checkpoint), the median
over steps (a first, warm-up step is not counted) and then over repeats. Repeats interleave
the methods; goals are paired ratios (hpcckpt step / PMDK step, same repeat), median over
repeats. Writes benchmarks/results/peers.json and peers.png (the plot needs matplotlib).
Needs the package installed (`pip install .`), h5py and a C compiler; run from any directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run_core import RESULTS, ROOT, goal, pyplot, save  # noqa: E402

RECORD = np.dtype([("key", "<u8"), ("value", "<f8"), ("pad", "u1", (48,))])
PMEMOBJ_HEADER = "/usr/include/libpmemobj.h"
# (method, dirty fraction, limit on its step time / PMDK's)
GOALS = [("put-only uffd", 0.001, 0.5), ("put-only uffd", 0.01, 0.3), ("put-only uffd", 0.1, 0.15),
         ("C stores uffd", 0.001, 1.5), ("C stores uffd", 0.01, 0.7)]

Step = dict   # {"t_update": s, "t_ckpt": s, "bytes": n, ...}: one step of one method
Updates = list[tuple[np.ndarray, np.ndarray]]   # per step: record indices, new records


def initial_table(n: int) -> np.ndarray:
    table = np.zeros(n, RECORD)
    table["key"] = np.arange(n)
    return table


def make_updates(n: int, fraction: float, steps: int, seed: int = 11) -> Updates:
    """`steps` batches of K distinct records each, Zipf(1.1)-weighted (Gumbel top-K sampling)."""
    rng = np.random.default_rng(seed)
    k = max(1, round(n * fraction))
    hot = rng.permutation(n)                      # rank r's record is hot[r]
    logw = -1.1 * np.log(np.arange(1, n + 1))     # Zipf weight of rank r+1, as a log
    batches = []
    for s in range(steps):
        ranks = np.argpartition(logw + rng.gumbel(size=n), n - k)[n - k:]
        idx = hot[rng.permutation(ranks)].astype(np.uint64)
        recs = np.zeros(k, RECORD)
        recs["key"] = idx
        recs["value"] = rng.standard_normal(k)
        recs["pad"] = (s + 1) & 0xFF
        batches.append((idx, recs))
    return batches


def write_stream(path: str, n: int, updates: Updates) -> None:
    """The updates for the C drivers: u64 N, STEPS, K, then per step K indices and K records."""
    with open(path, "wb") as f:
        np.array([n, len(updates), len(updates[0][0])], np.uint64).tofile(f)
        for idx, recs in updates:
            idx.tofile(f)
            recs.tofile(f)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# -- the methods: each runs every step of `updates` on a fresh table and returns
#    (per-step figures, final table equals `ref`)

def run_put(work: str, n: int, updates: Updates, ref: np.ndarray, tracker: str,
            writes: str = "any") -> tuple[list[Step], bool]:
    import hpcckpt
    path = os.path.join(work, "put.heap")
    heap = hpcckpt.Heap.create(path, capacity=n * RECORD.itemsize + (64 << 20), tracker=tracker)
    try:
        pool = heap.pool("t", RECORD, n, writes=writes)
        everything, start = np.arange(n), initial_table(n)
        for _ in range(2):   # both checkpoint copies of every record exist: the steady state
            pool.put(everything, start)
            heap.checkpoint()
        steps = []
        for idx, recs in updates:
            t0 = time.perf_counter()
            pool.put(idx, recs)
            t1 = time.perf_counter()
            heap.checkpoint()
            t2 = time.perf_counter()
            st = heap.stats
            steps.append({"t_update": t1 - t0, "t_ckpt": t2 - t1, "bytes": st["bytes_copied"],
                          "bytes_meta": st["bytes_meta"], "views_degraded": st["views_degraded"]})
        return steps, same(pool.take(everything), ref)
    finally:
        heap.close()
        os.unlink(path)


def run_driver(cmd: list[str], out: str, ref: np.ndarray, env: dict | None = None,
               leftover: str = "") -> tuple[list[Step], bool]:
    """A C driver's JSON lines, and whether the table it wrote to `out` equals `ref`; `out` and
    `leftover` (the heap or pool file, which the driver removes itself unless it failed) are gone after."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if res.returncode:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {res.stderr.strip()}")
        return [json.loads(line) for line in res.stdout.splitlines()], same(np.fromfile(out, RECORD), ref)
    finally:
        for path in (out, leftover):
            if path and os.path.exists(path):
                os.unlink(path)


def run_dump(work: str, updates: Updates, ref: np.ndarray, write: Callable[[str, np.ndarray], None],
             read: Callable[[str], np.ndarray]) -> tuple[list[Step], bool]:
    path = os.path.join(work, "dump")
    table = initial_table(len(ref))
    steps = []
    try:
        for idx, recs in updates:
            t0 = time.perf_counter()
            table[idx] = recs
            t1 = time.perf_counter()
            write(path, table)
            t2 = time.perf_counter()
            steps.append({"t_update": t1 - t0, "t_ckpt": t2 - t1, "bytes": os.path.getsize(path)})
        return steps, same(read(path), ref)
    finally:
        os.unlink(path)


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def h5_write(path: str, table: np.ndarray) -> None:
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset("table", data=table)
    fsync(path)


def h5_read(path: str) -> np.ndarray:
    import h5py
    with h5py.File(path, "r") as f:
        return f["table"][()]


def npy_write(path: str, table: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, table)
        f.flush()
        os.fsync(f.fileno())


def npy_read(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.load(f)


def build(work: str) -> dict[str, str]:
    """Compile the C drivers: peers_core.c over the C core's sources, peers_pmdk.c when PMDK is there."""
    native = os.path.join(ROOT, "native")
    srcs = [os.path.join(native, f) for f in sorted(os.listdir(native)) if f.endswith(".c")]
    exes = {"core": os.path.join(work, "peers_core")}
    subprocess.run(["cc", "-O2", "-std=gnu11", f"-I{native}", f"-I{native}/include",
                    os.path.join(HERE, "peers_core.c"), *srcs, "-o", exes["core"]], check=True)
    if os.path.exists(PMEMOBJ_HEADER):
        exes["pmdk"] = os.path.join(work, "peers_pmdk")
        subprocess.run(["cc", "-O2", "-std=gnu11", os.path.join(HERE, "peers_pmdk.c"), "-o", exes["pmdk"],
                        "-lpmemobj", "-lpmem"], check=True)
    else:
        print(f"  SKIP  PMDK transactions: {PMEMOBJ_HEADER} not found (apt-get install libpmemobj-dev)")
    return exes


def methods(exes: dict[str, str], work: str, stream: str, n: int, updates: Updates,
            ref: np.ndarray) -> dict[str, Callable[[], tuple[list[Step], bool]]]:
    import hpcckpt
    out = os.path.join(work, "final.bin")
    trackers = ["uffd", "mprotect"] if hpcckpt.resolve_tracker("auto") == "uffd" else ["mprotect"]
    if trackers == ["mprotect"]:
        print("  SKIP  uffd lines: this kernel lacks userfaultfd async write-protect (Linux >= 6.7)")
    ms: dict[str, Callable[[], tuple[list[Step], bool]]] = {}
    for t in trackers:
        ms[f"put {t}"] = lambda t=t: run_put(work, n, updates, ref, t)
    ms[f"put-only {trackers[0]}"] = lambda: run_put(work, n, updates, ref, trackers[0], "put")
    for t in trackers:
        ms[f"C stores {t}"] = lambda t=t: run_driver([exes["core"], work, t, stream, out], out, ref,
                                                      leftover=os.path.join(work, "peers-core.heap"))
    if "pmdk" in exes:
        pool = os.path.join(work, "pmdk.pool")
        env = {**os.environ, "PMEM_IS_PMEM_FORCE": "1"}
        ms["PMDK tx"] = lambda: run_driver([exes["pmdk"], pool, stream, out], out, ref, env, leftover=pool)
    ms["h5py dump"] = lambda: run_dump(work, updates, ref, h5_write, h5_read)
    ms["np.save dump"] = lambda: run_dump(work, updates, ref, npy_write, npy_read)
    return ms


def summary(steps: list[Step]) -> dict:
    """Median per-step figures of one run, the warm-up step left out."""
    counted = steps[1:] or steps
    return {"t_update": statistics.median(s["t_update"] for s in counted),
            "t_ckpt": statistics.median(s["t_ckpt"] for s in counted),
            "t_step": statistics.median(s["t_update"] + s["t_ckpt"] for s in counted),
            "bytes": statistics.median(s["bytes"] for s in counted),
            "views_degraded": max(s.get("views_degraded", 0) for s in counted),
            **({"pmem_is_pmem": steps[0]["pmem_is_pmem"]} if "pmem_is_pmem" in steps[0] else {})}


def bench(n: int, steps: int, repeats: int, fractions: list[float]) -> dict:
    work = tempfile.mkdtemp(prefix="hpcckpt-peers-", dir="/dev/shm")
    build_dir = tempfile.mkdtemp(prefix="hpcckpt-peers-build-")
    runs: dict[float, dict[str, list[dict]]] = {}
    correct: dict[str, bool] = {}
    try:
        exes = build(build_dir)
        for frac in fractions:
            updates = make_updates(n, frac, steps + 1)
            ref = initial_table(n)
            for idx, recs in updates:
                ref[idx] = recs
            stream = os.path.join(work, "updates.bin")
            write_stream(stream, n, updates)
            ms = methods(exes, work, stream, n, updates, ref)
            runs[frac] = {m: [] for m in ms}
            for r in range(repeats):   # rotate the order, so no method always runs first
                names = list(ms)
                for m in names[r % len(names):] + names[:r % len(names)]:
                    per_step, ok = ms[m]()
                    runs[frac][m].append(summary(per_step))
                    correct[m] = correct.get(m, True) and ok
            os.unlink(stream)
            del updates, ref
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(build_dir, ignore_errors=True)
    return report(n, steps, repeats, fractions, runs, correct)


def report(n: int, steps: int, repeats: int, fractions: list[float], runs: dict, correct: dict) -> dict:
    rows = []
    print(f"\n{n:,} records of 64 B, {steps} steps (+1 warm-up) x {repeats} repeats; medians; "
          f"ratio = step / PMDK tx step (paired, same repeat)")
    print(f"{'dirty':>6} {'K':>7}  {'method':17} {'MB/ckpt':>8} {'update ms':>10} {'ckpt ms':>9} "
          f"{'step ms':>9} {'/PMDK':>7}  correct")
    for frac in fractions:
        pmdk = runs[frac].get("PMDK tx")
        for m, reps in runs[frac].items():
            med = {key: statistics.median(r[key] for r in reps) for key in ("t_update", "t_ckpt", "t_step", "bytes")}
            ratio = statistics.median(a["t_step"] / b["t_step"] for a, b in zip(reps, pmdk)) if pmdk else None
            degraded = max(r["views_degraded"] for r in reps)
            rows.append({"method": m, "fraction": frac, "k": max(1, round(n * frac)), **med,
                         "ratio_to_pmdk": ratio, "views_degraded": degraded, "correct": correct[m], "repeats": reps})
            print(f"{frac:6.1%} {rows[-1]['k']:7d}  {m:17} {med['bytes'] / 1e6:8.3f} {med['t_update'] * 1e3:10.3f} "
                  f"{med['t_ckpt'] * 1e3:9.3f} {med['t_step'] * 1e3:9.3f} "
                  f"{'-' if ratio is None else f'{ratio:.3f}':>7}  {'yes' if correct[m] else 'NO'}"
                  f"{f'  (mprotect degraded {degraded} views)' if degraded else ''}")
    pmem = [r.get("pmem_is_pmem") for reps in runs.values() for r in reps.get("PMDK tx", [])]
    if pmem:
        print(f"PMDK pool taken for persistent memory (flushes, no msync): {'yes' if all(pmem) else 'NO'}; "
              f"its checkpoint is the commit, its undo logging (tx_add_range) counts as update")
    goals = [goal("every method's final table equals the numpy reference", float(all(correct.values())), 1, True)]
    for m, frac, limit in GOALS:
        row = next((r for r in rows if r["method"] == m and r["fraction"] == frac), None)
        if row is None:
            continue
        if row["ratio_to_pmdk"] is None:
            print(f"  SKIP  {m} step / PMDK tx step at {frac:.1%}: no PMDK (apt-get install libpmemobj-dev)")
            continue
        goals.append(goal(f"{m} step / PMDK tx step at {frac:.1%} dirty", row["ratio_to_pmdk"], limit, False))
    res = {"records": n, "record_bytes": RECORD.itemsize, "steps": steps, "repeats": repeats,
           "fractions": fractions, "zipf": 1.1, "rows": rows, "goals": goals}
    plot(rows, n)
    save("peers", res)
    return res


def plot(rows: list[dict], n: int) -> None:
    plt = pyplot()
    if not plt:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("bytes", 1e-6, "MB per checkpoint"), ("t_ckpt", 1e3, "checkpoint ms"),
              ("t_step", 1e3, "step ms (update + checkpoint)"))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m]
        for ax, (key, scale, _) in zip(axes, panels):
            ax.plot([r["fraction"] * 100 for r in pts], [r[key] * scale for r in pts],
                    "s--" if "dump" in m else "o-", label=m)
    for ax, (_, _, ylabel) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("records rewritten per step (%)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"A table of {n:,} records of 64 B, Zipf(1.1) updates, one checkpoint per step")
    fig.tight_layout()
    os.makedirs(RESULTS, exist_ok=True)
    fig.savefig(os.path.join(RESULTS, "peers.png"), dpi=120)
    print(f"wrote {os.path.join(RESULTS, 'peers.png')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=5, help="checkpoints counted per run (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fractions", default="0.001,0.01,0.1", help="records rewritten per step, comma-separated")
    args = ap.parse_args(argv)
    res = bench(args.records, args.steps, args.repeats, [float(f) for f in args.fractions.split(",")])
    return 0 if all(g["pass"] for g in res["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
