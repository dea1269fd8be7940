"""The partner level's cost: bytes sent to the partner against bytes copied locally and against
a whole-heap copy (what file-based partner schemes send), and checkpoint time with the partner
level against local-only, in the same run.

    python benchmarks/bench_partner.py              # about a minute
    python benchmarks/bench_partner.py --repeats 1 --records 200000

Two workloads on simulated nodes (HPCCKPT_NODE_OF_RANK): the demo at 4 ranks on 2 nodes
(a checkpoint every 10 steps), and a pool of 1M records of 64 B per rank at 2 ranks on 2 nodes,
1 % rewritten through ``put`` per checkpoint.  Runs alternate between ``--redundancy partner``
and local-only.  Goals: data sent = bytes copied, metadata <= 2 % of it; checkpoint time with
the partner level <= 2x local-only.  Writes benchmarks/results/partner.json.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run_core import goal, save  # noqa: E402

from hpcckpt.run import find_mpiexec, kill_tree  # noqa: E402


def mpirun(n: int, args: list[str], nodes: str, timeout: float = 600) -> str:
    env = dict(os.environ, HPCCKPT_NODE_OF_RANK=nodes)
    proc = subprocess.Popen([find_mpiexec(), "-n", str(n), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    if proc.returncode:
        raise SystemExit(f"bench_partner: exit {proc.returncode}: {' '.join(args)}\n{err}")
    return out


def timing(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("timing: "))[len("timing: "):])


def demo(redundancy: str, root: str, steps: int) -> dict:
    args = [sys.executable, "-m", "hpcckpt.demo", "--steps", str(steps), "--checkpoint-every", "10",
            "--redundancy", redundancy, "--root", os.path.join(root, "n{node}"), "--name", f"b{time.monotonic_ns()}"]
    t = timing(mpirun(4, args, "0,0,1,1"))
    return {"t_ckpt": t["t_save"] / t["n_save"], "copied": t.get("partner_bytes_copied", 0),
            "sent": t.get("partner_bytes_sent", 0), "data": t.get("partner_data_bytes_sent", 0),
            "whole": t["state_bytes"] * t["n_save"]}


def pool_part(redundancy: str, root: str, records: int, steps: int) -> None:
    """One rank of the pool workload (run under mpiexec); rank 0 prints its figures as JSON."""
    import numpy as np
    import hpcckpt
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rec = np.dtype([("key", "<u8"), ("value", "<f8"), ("pad", "u1", (48,))])
    heap = hpcckpt.open("pool", comm, root=os.path.join(root, "n{node}"), capacity=records * 80 + (64 << 20),
                        redundancy=redundancy)
    pool = heap.pool("t", rec, records, writes="put")
    heap.checkpoint()
    rng, ts, copied, sent, data = np.random.default_rng(comm.rank), [], 0, 0, 0
    for s in range(steps):
        idx = np.sort(rng.choice(records, records // 100, replace=False))
        vals = np.zeros(idx.size, rec)
        vals["value"] = s
        pool.put(idx, vals)
        comm.Barrier()
        t = time.perf_counter()
        heap.checkpoint()
        ts.append(time.perf_counter() - t)
        st = heap.stats
        copied += st["bytes_copied"]
        sent += st.get("partner", {}).get("bytes_sent", 0)
        data += st.get("partner", {}).get("data_bytes_sent", 0)
    heap.close()
    if comm.rank == 0:
        print("timing: " + json.dumps({"t_ckpt": statistics.median(ts), "copied": copied, "sent": sent, "data": data,
                                       "whole": records * rec.itemsize * steps}))


def pool(redundancy: str, root: str, records: int, steps: int) -> dict:
    return timing(mpirun(2, [sys.executable, __file__, "--rank-part", redundancy, root, str(records), str(steps)],
                         "0,1"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank-part", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_part:
        red, root, records, steps = args.rank_part
        pool_part(red, root, int(records), int(steps))
        return 0
    res, goals = {}, []
    for name, run in (("demo", lambda red, root: demo(red, root, 100)),
                      ("pool", lambda red, root: pool(red, root, args.records, args.steps))):
        runs = {"partner": [], "none": []}
        for _ in range(args.repeats):
            for red in runs:
                root = tempfile.mkdtemp(prefix="hpcckpt-bench-partner-", dir="/dev/shm")
                try:
                    runs[red].append(run(red, root))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
        p = runs["partner"][0]
        ratio = statistics.median(a["t_ckpt"] / b["t_ckpt"] for a, b in zip(runs["partner"], runs["none"]))
        meta = (p["sent"] - p["data"]) / p["data"]
        res[name] = {"runs": runs, "time_ratio": ratio, "metadata_share": meta}
        print(f"{name}: rank 0 sent {p['sent'] / 1e6:.2f} MB to its partner ({p['data'] / 1e6:.2f} MB data, copied "
              f"locally {p['copied'] / 1e6:.2f} MB; a whole-heap copy each time: {p['whole'] / 1e6:.2f} MB); "
              f"checkpoint {statistics.median(r['t_ckpt'] for r in runs['partner']) * 1e3:.2f} ms with the partner "
              f"level, {statistics.median(r['t_ckpt'] for r in runs['none']) * 1e3:.2f} ms local-only")
        goals += [goal(f"{name}: data sent = bytes copied locally", float(p["data"] == p["copied"]), 1, True),
                  goal(f"{name}: metadata sent / data sent", meta, 0.02, False),
                  goal(f"{name}: bytes sent / whole-heap copy", p["sent"] / p["whole"], 1, False),
                  goal(f"{name}: checkpoint time with partner / local-only", ratio, 2, False)]
    res["goals"] = goals
    save("partner", res)
    return 0 if all(g["pass"] for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
