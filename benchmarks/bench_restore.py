"""Restore from an export against h5py reading the same blocks (issue 23), in one run.

A state of 131 MB in all, as the issue measured it: a distributed array of 64 MiB (8192 x 1024
float64) and a distributed pool of 1M objects of 64 B (8 float64 each), checkpointed and
exported by --writers ranks. Then, --repeats times in alternation at --readers ranks:

* hpcckpt: the local heaps are removed and ``hpcckpt.open`` restores from the export, until
  the data is readable (``heap["a"]``, ``heap["p"]``), every byte checked against its CRC; the
  time of its phases (fill from the export, the local commit) is reported too;
* h5py: each rank reads the rows the default split gives it, straight from the rank files
  that hold them (``read_direct`` into ``np.empty``), no check.

Goals: hpcckpt / h5py <= 1.0 at N -> M ranks (4 -> 2), <= 0.8 at the same count (2 -> 2).

    python benchmarks/bench_restore.py              # 4 -> 2 and 2 -> 2, 5 repeats each
    python benchmarks/bench_restore.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS, COLS, RECORDS = 8192, 1024, 1 << 20
GOALS = {"N -> M": 1.0, "same count": 0.8}


def default_split(n: int, size: int, r: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank r in numpy.array_split's split of n rows over size ranks."""
    q, extra = divmod(n, size)
    lo = r * q + min(r, extra)
    return lo, lo + q + (r < extra)


def worker_write(args) -> None:
    from mpi4py import MPI
    import hpcckpt
    comm = MPI.COMM_WORLD
    r, size = comm.rank, comm.size
    heap = hpcckpt.open("bres", comm, root=os.path.join(args.dir, "w"), capacity="1GiB",
                        export_dir=os.path.join(args.dir, "x"))
    lo, hi = default_split(ROWS, size, r)
    a = heap.array("a", (hi - lo, COLS), "f8", global_shape=(ROWS, COLS), offset=(lo, 0))
    a[...] = np.arange(lo, hi, dtype="f8")[:, None]
    plo, phi = default_split(RECORDS, size, r)
    p = heap.pool("p", "f8", phi - plo, (8,), global_count=RECORDS, offset=plo)
    p.put(np.arange(phi - plo), np.repeat(np.arange(plo, phi, dtype="f8")[:, None], 8, axis=1))
    heap.checkpoint(step=1)
    heap.export()
    heap.close()


def h5py_read(comm, job_dir: str) -> dict:
    """The baseline: this rank's default-split rows of each object, read from the rank files."""
    import h5py
    from hpcckpt.manifest import load_manifest, read_latest
    m = load_manifest(job_dir, read_latest(job_dir))
    out, files = {}, {}
    for name, obj in sorted(m.objects.items()):
        lo, hi = default_split(obj["global_shape"][0], comm.size, comm.rank)
        dst = np.empty((hi - lo, *obj["global_shape"][1:]), "f8")
        for b in obj["blocks"]:
            a, z = max(lo, b["offset"][0]), min(hi, b["offset"][0] + b["shape"][0])
            if a >= z:
                continue
            if b["file"] not in files:
                files[b["file"]] = h5py.File(os.path.join(job_dir, b["file"]), "r")
            ds = files[b["file"]][b["dataset"]]
            ds.read_direct(dst, np.s_[a - b["offset"][0]:z - b["offset"][0]], np.s_[a - lo:z - lo])
        out[name] = dst
    for f in files.values():
        f.close()
    return out


def worker_restore(args) -> None:
    from mpi4py import MPI
    import hpcckpt
    import hpcckpt.job as job
    comm = MPI.COMM_WORLD
    r, size = comm.rank, comm.size
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    job.fill_from_export = timed("fill", job.fill_from_export)
    job.coordinated_checkpoint = timed("local commit", job.coordinated_checkpoint)
    ours, base, phase_runs = [], [], []
    lo, hi = default_split(ROWS, size, r)
    for _ in range(args.repeats):
        if r == 0:   # the heaps are gone: the restore comes from the export
            shutil.rmtree(os.path.join(args.dir, "w", "bres"), ignore_errors=True)
        phases.clear()
        comm.Barrier()
        t0 = time.perf_counter()
        heap = hpcckpt.open("bres", comm, root=os.path.join(args.dir, "w"), capacity="1GiB",
                            export_dir=os.path.join(args.dir, "x"))
        a, p = heap["a"], heap["p"]
        comm.Barrier()
        ours.append(time.perf_counter() - t0)
        phase_runs.append(dict(phases))
        assert heap.restored_from == "export" and a.shape == (hi - lo, COLS) and a[-1, -1] == hi - 1
        assert p[len(p) - 1][0] == default_split(RECORDS, size, r)[1] - 1
        heap.close()
        comm.Barrier()
        t0 = time.perf_counter()
        got = h5py_read(comm, os.path.join(args.dir, "x", "bres"))
        comm.Barrier()
        base.append(time.perf_counter() - t0)
        assert got["a"][-1, -1] == hi - 1
    res = comm.gather({"hpcckpt_s": ours, "h5py_s": base, "phases": phase_runs})
    if r == 0:
        print("RESULT " + json.dumps(res), flush=True)


def run(n: int, *argv: str) -> object:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_core import run_mpi
    return run_mpi(__file__, n, *argv, timeout=900)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=4, help="ranks that write the export of the N -> M case")
    ap.add_argument("--readers", type=int, default=2, help="ranks that restore")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["write", "restore"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        {"write": worker_write, "restore": worker_restore}[args.worker](args)
        return
    sys.path.insert(0, HERE)
    from run_core import goal, save
    out, goals = {}, []
    for label, writers in (("N -> M", args.writers), ("same count", args.readers)):
        d = tempfile.mkdtemp(prefix="bench-restore-", dir="/dev/shm")
        try:
            common = ["--repeats", str(args.repeats), "--dir", d]
            run(writers, "--worker", "write", *common)
            res = run(args.readers, "--worker", "restore", *common)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        ours = [max(x) for x in zip(*(r["hpcckpt_s"] for r in res))]   # the slowest rank of each run
        base = [max(x) for x in zip(*(r["h5py_s"] for r in res))]
        phases = {k: statistics.median(max(r["phases"][i].get(k, 0.0) for r in res) for i in range(len(ours)))
                  for k in ("fill", "local commit")}
        ratio = statistics.median(ours) / statistics.median(base)
        print(f"{label} ({writers} -> {args.readers} ranks): hpcckpt.open {statistics.median(ours) * 1e3:.1f} ms "
              f"[{min(ours) * 1e3:.1f}-{max(ours) * 1e3:.1f}] (fill {phases['fill'] * 1e3:.1f}, local commit "
              f"{phases['local commit'] * 1e3:.1f}), h5py read {statistics.median(base) * 1e3:.1f} ms "
              f"[{min(base) * 1e3:.1f}-{max(base) * 1e3:.1f}]: {ratio:.2f}x")
        out[label] = {"writers": writers, "readers": args.readers, "hpcckpt_s": ours, "h5py_s": base,
                      "phases_s": phases, "ratio": ratio}
        goals.append(goal(f"restore from an export, {label} / h5py read of the same blocks", ratio, GOALS[label],
                          False))
    save("restore", {"args": vars(args), "results": out, "goals": goals})


if __name__ == "__main__":
    main()
