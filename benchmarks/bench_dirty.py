"""A checkpoint's cost against what is dirty, each figure beside its baseline of the same run.

    python benchmarks/bench_dirty.py                 # about two minutes
    python benchmarks/bench_dirty.py --quick         # smaller pools, for a smoke run

Parts (issue 11), every one on tmpfs with the uffd tracker unless it says otherwise:

- ``gather``: a pool of 1M records of 64 B, K records rewritten per step (0.1 / 1 / 10 %),
  one checkpoint per step, against the physical limit: a numpy gather (``table.take(idx)``)
  of the same records from a populated table that nothing has just written (cold, as the
  checkpoint's reads of records written earlier in the step would be on a real code).  Through ``put`` into a pool declared
  ``writes="put"``, through ``put`` into a watched pool, and by direct element writes.
- ``scale``: 1,000 dirty records in a 16M-record pool against the same in a 1M-record pool.
- ``warmup``: checkpoints 2-6 after the first against the steady state (steps 20-30), same K,
  and the minor page faults they take.
- ``full``: the ``full`` tracker on a 256 MiB array against ``np.copyto`` of the same bytes;
  CRC32C throughput on one core.
- ``scatter``: 1 % of the pages of a 1 GiB array, the checkpoint against a numpy gather of
  the same pages.
- ``elements``: ``pool[i]["value"] = v`` and its read against a numpy structured array.

Every part checks what it copied (bytes copied = bytes dirty) and its final contents.  Prints
PASS/FAIL per goal and writes benchmarks/results/dirty.json.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run_core import goal, save  # noqa: E402

import hpcckpt  # noqa: E402
from hpcckpt import _native  # noqa: E402

RECORD = np.dtype([("key", "<u8"), ("value", "<f8"), ("pad", "u1", (48,))])


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class Table:
    """A pool of n records in a fresh heap, and a numpy copy of what it must hold."""

    def __init__(self, work: str, n: int, writes: str = "any", tracker: str = "uffd"):
        self.path = os.path.join(work, f"t{n}.heap")
        self.heap = hpcckpt.Heap.create(self.path, capacity=n * 80 + (64 << 20), tracker=tracker)   # + tags
        self.pool = self.heap.pool("t", RECORD, n, writes=writes)
        self.ref = np.zeros(n, RECORD)
        self.ref["key"] = np.arange(n)
        self.pool.put(np.arange(n), self.ref)
        self.heap.checkpoint()
        self.cold = self.ref.copy()   # the gather baseline reads records nothing has just written

    def step(self, idx: np.ndarray, value: float, direct: bool) -> float:
        """Rewrite records idx, checkpoint; returns the checkpoint's seconds."""
        self.ref["value"][idx] = value
        if direct:
            for i in idx.tolist():
                self.pool[i]["value"] = value
        else:
            self.pool.put(idx, self.ref[idx])
        t = time.perf_counter()
        self.heap.checkpoint()
        elapsed = time.perf_counter() - t
        assert self.heap.stats["bytes_copied"] == idx.size * RECORD.itemsize, self.heap.stats
        return elapsed

    def close(self) -> None:
        assert np.array_equal(self.pool.take(np.arange(len(self.ref))), self.ref), "final contents differ"
        self.heap.close()
        os.unlink(self.path)


def dirty(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(n, k, replace=False))


def gather_s(table: np.ndarray, idx: np.ndarray, repeats: int = 5) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        table.take(idx, axis=0)
        ts.append(time.perf_counter() - t)
    return med(ts)


def part_gather(work: str, n: int, steps: int, fractions: list[float]) -> tuple[dict, list]:
    rng, out, goals = np.random.default_rng(1), {}, []
    for mode, writes, direct, limit in (("put-only", "put", False, 10), ("put", "any", False, None),
                                        ("direct", "any", True, 20)):
        t = Table(work, n, writes)
        for frac in fractions:
            k = max(1, int(n * frac))
            if direct and k > 20_000:
                continue   # the Python element loop would dominate the run
            ck, ga = [], []
            for s in range(steps):
                idx = dirty(rng, n, k)
                ck.append(t.step(idx, s + frac, direct))
                ga.append(gather_s(t.cold, idx, 1))
            ratio = med(ck) / med(ga)
            out[f"{mode} {frac:.1%}"] = {"ckpt_ms": med(ck) * 1e3, "gather_ms": med(ga) * 1e3, "ratio": ratio}
            print(f"  {mode:9} {frac:6.1%}  K={k:7d}  checkpoint {med(ck) * 1e3:8.3f} ms   gather "
                  f"{med(ga) * 1e3:7.3f} ms   {ratio:6.1f}x")
            if limit:
                goals.append(goal(f"{mode} checkpoint / numpy gather at {frac:.1%}", ratio, limit, False))
        t.close()
    return out, goals


def part_scale(work: str, small: int, large: int, steps: int) -> tuple[dict, list]:
    rng, out, goals = np.random.default_rng(2), {}, []
    for mode, writes, direct in (("put-only", "put", False), ("direct", "any", True)):
        times = {}
        for n in (small, large):
            t = Table(work, n, writes)
            times[n] = med([t.step(dirty(rng, n, 1000), s + 1.0, direct) for s in range(steps)])
            t.close()
        ratio = times[large] / times[small]
        out[mode] = {"small_ms": times[small] * 1e3, "large_ms": times[large] * 1e3, "ratio": ratio}
        print(f"  {mode:9} 1,000 dirty: {small:,} records {times[small] * 1e3:7.3f} ms, {large:,} records "
              f"{times[large] * 1e3:7.3f} ms: {ratio:.2f}x")
        goals.append(goal(f"{mode}: 1,000 dirty in {large:,} / in {small:,} records", ratio, 2, False))
    return out, goals


def part_warmup(work: str, n: int) -> tuple[dict, list]:
    rng, out, goals = np.random.default_rng(3), {}, []
    for pre in (False, True):
        path = os.path.join(work, "w.heap")
        heap = hpcckpt.Heap.create(path, capacity=n * 80 + (64 << 20), preallocate=pre)
        pool = heap.pool("t", RECORD, n, writes="put")
        heap.checkpoint()
        ts, faults = [], []
        for s in range(30):
            idx = dirty(rng, n, n // 100)
            pool.put(idx, np.zeros(idx.size, RECORD))
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            heap.checkpoint()
            ts.append(time.perf_counter() - t)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        heap.close()
        os.unlink(path)
        ratio = max(ts[1:6]) / med(ts[19:])
        key = "preallocate" if pre else "sparse"
        out[key] = {"early_ms": [x * 1e3 for x in ts[:6]], "steady_ms": med(ts[19:]) * 1e3,
                    "early_faults": faults[:6], "steady_faults": med(faults[19:]), "ratio": ratio}
        print(f"  {key:11}: checkpoints 1-6 {' '.join(f'{x * 1e3:.2f}' for x in ts[:6])} ms "
              f"({' '.join(str(f) for f in faults[:6])} faults), steady {med(ts[19:]) * 1e3:.2f} ms")
        goals.append(goal(f"warm-up ({key}): worst of checkpoints 2-6 / steady state", ratio, 1.5, False))
    return out, goals


def part_full(work: str, mib: int) -> tuple[dict, list]:
    path = os.path.join(work, "f.heap")
    heap = hpcckpt.Heap.create(path, capacity=f"{mib + 16}MiB", tracker="full")
    a = heap.array("a", mib << 17)
    a[:] = 1.0
    heap.checkpoint()
    heap.checkpoint()
    dst = np.ones_like(a)
    tk, tc = [], []
    for r in range(5):
        a += 1
        t = time.perf_counter()
        heap.checkpoint()
        tk.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(dst, a)
        tc.append(time.perf_counter() - t)
    assert heap.stats["bytes_copied"] == a.nbytes and np.array_equal(dst, a)
    heap.close()
    os.unlink(path)
    buf = np.random.default_rng(4).integers(0, 256, 256 << 20, dtype=np.uint8)
    tcrc = []
    for _ in range(5):
        t = time.perf_counter()
        _native.crc32c(buf)
        tcrc.append(time.perf_counter() - t)
    ratio, gbps = med(tk) / med(tc), buf.nbytes / med(tcrc) / 1e9
    print(f"  full {mib} MiB: checkpoint {med(tk) * 1e3:.1f} ms, np.copyto {med(tc) * 1e3:.1f} ms: {ratio:.2f}x; "
          f"CRC32C {gbps:.1f} GB/s")
    return ({"ckpt_ms": med(tk) * 1e3, "copyto_ms": med(tc) * 1e3, "ratio": ratio, "crc_gbps": gbps},
            [goal("full checkpoint / np.copyto", ratio, 1.5, False), goal("CRC32C GB/s, one core", gbps, 6, True)])


def part_scatter(work: str, mib: int) -> tuple[dict, list]:
    path = os.path.join(work, "s.heap")
    heap = hpcckpt.Heap.create(path, capacity=f"{mib + 16}MiB")
    a = heap.array("a", mib << 17)
    a[:] = 1.0
    heap.checkpoint()
    a += 1
    heap.checkpoint()
    rows, rng, tk, tg = a.reshape(-1, 512), np.random.default_rng(5), [], []
    for r in range(7):
        pages = dirty(rng, rows.shape[0], rows.shape[0] // 100)
        rows[pages, 0] += 1
        t = time.perf_counter()
        heap.checkpoint()
        tk.append(time.perf_counter() - t)
        assert heap.stats["bytes_copied"] == pages.size * 4096
        tg.append(gather_s(rows, pages, 1))
    heap.close()
    os.unlink(path)
    ratio = med(tg) / med(tk)
    print(f"  1% of the pages of {mib} MiB: checkpoint {med(tk) * 1e3:.2f} ms, numpy gather {med(tg) * 1e3:.2f} ms: "
          f"{ratio:.2f}x the gather's speed")
    return ({"ckpt_ms": med(tk) * 1e3, "gather_ms": med(tg) * 1e3, "speed_ratio": ratio},
            [goal("scattered dirty pages: copy speed / numpy gather speed", ratio, 0.9, True)])


def part_elements(work: str, n: int) -> tuple[dict, list]:
    """Element access from Python: first writes (each takes the tracker's write fault), then
    the same objects again (the access path alone), reads; and the vector path for a field."""
    t = Table(work, n)
    plain = t.ref.copy()
    idx = np.random.default_rng(6).choice(n, 20_000, replace=False)
    order = idx.tolist()

    def per_object(fn, target) -> float:
        s = time.perf_counter()
        fn(target)
        return (time.perf_counter() - s) / len(order)

    def wr(target) -> None:
        for i in order:
            target[i]["value"] = 1.0

    def rd(target) -> None:
        for i in order:
            target[i]["value"]

    first, again, w_np = per_object(wr, t.pool), per_object(wr, t.pool), per_object(wr, plain)
    r_pool, r_np = per_object(rd, t.pool), per_object(rd, plain)
    t.ref["value"][idx] = 1.0
    t.heap.checkpoint()
    s = time.perf_counter()
    t.pool.put(idx, 2.0, field="value")
    vec = (time.perf_counter() - s) / len(order)
    t.ref["value"][idx] = 2.0
    t.close()
    print(f"  element write {first * 1e6:.2f} us first (with its write fault), {again * 1e6:.2f} us again, "
          f"numpy {w_np * 1e6:.2f} us; read {r_pool * 1e6:.2f} us vs {r_np * 1e6:.2f} us; "
          f"put(field=) {vec * 1e6:.3f} us per object")
    return ({"first_write_us": first * 1e6, "write_us": again * 1e6, "numpy_write_us": w_np * 1e6,
             "read_us": r_pool * 1e6, "numpy_read_us": r_np * 1e6, "put_field_us": vec * 1e6},
            [goal("pool[i] element write / numpy (no fault)", again / w_np, 2, False),
             goal("pool[i] element read / numpy", r_pool / r_np, 2, False)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not the figures")
    ap.add_argument("--only", nargs="+", metavar="PART", help="run only these parts (gather, scale, ...)")
    args = ap.parse_args(argv)
    n, large, mib, steps = (100_000, 400_000, 64, 3) if args.quick else (1_000_000, 16_000_000, 1024, 7)
    work = tempfile.mkdtemp(prefix="hpcckpt-dirty-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    res, goals = {}, []
    try:
        for name, fn in (("gather", lambda: part_gather(work, n, steps, [0.001, 0.01, 0.1])),
                         ("scale", lambda: part_scale(work, n, large, 2 * steps + 1)),   # a cheap part: more steps
                         ("warmup", lambda: part_warmup(work, n)),
                         ("full", lambda: part_full(work, mib // 4)),
                         ("scatter", lambda: part_scatter(work, mib)),
                         ("elements", lambda: part_elements(work, n))):
            if args.only and name not in args.only:
                continue
            print(f"{name}:")
            res[name], g = fn()
            goals += g
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["goals"] = goals
    save("dirty", res)
    return 0 if all(g["pass"] for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
