"""Issue 4's benchmark: the demo with hpcckpt checkpoints against no checkpoints, h5py and np.save.

Runs ``mpiexec -n R python -m hpcckpt.demo`` in four modes, interleaved ``--repeats`` times:
``none`` (``--no-checkpoint``, the baseline), ``hpcckpt`` (a checkpoint every K steps, fresh
heaps under /dev/shm), ``h5py`` and ``npy`` (``--no-checkpoint --save-with ...`` every K steps,
also under /dev/shm). Takes the median per mode; writes ``benchmarks/results/demo.json``.

Goals: at most 5% run-time overhead at K = 10; at least 10x less time per checkpoint than
per h5py dump, and at least 2x less than per np.save (both baselines fsync and then take the
one Allreduce that any coordinated global checkpoint needs).

The default is one rank per CPU of this machine.  More ranks than CPUs (``--ranks 4`` on two)
oversubscribe: every collective then waits for ranks to be scheduled (an Allreduce costs about
0.6 ms there against 8 us at one rank per CPU), which both sides of the comparison pay.

Example::

    $ python benchmarks/bench_demo.py --repeats 3
    $ python benchmarks/bench_demo.py --steps 50 --nx 256 --ny 256 --particles 20000 --repeats 1
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
from pathlib import Path

from hpcckpt.run import find_mpiexec, kill_tree

MODES = {"none": ["--no-checkpoint"], "hpcckpt": [],
         "h5py": ["--no-checkpoint", "--save-with", "h5py"], "npy": ["--no-checkpoint", "--save-with", "npy"]}
GOALS = {"max_overhead": 0.05, "min_h5py_over_hpcckpt": 10.0, "min_npy_over_hpcckpt": 2.0}
RESULTS = Path(__file__).resolve().parent / "results" / "demo.json"


def run(cmd: list[str], cwd: str, timeout: float) -> str:
    """Run ``cmd`` in its own process group; kill its process groups on timeout. Returns stdout.

    >>> run([sys.executable, "-c", "print('hi')"], tempfile.gettempdir(), 10)
    'hi\\n'
    """
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout, or ^C
        kill_tree(proc.pid)
        proc.communicate()
        raise SystemExit(f"bench_demo: timed out or interrupted after at most {timeout} s: {' '.join(cmd)}")
    if proc.returncode != 0:
        raise SystemExit(f"bench_demo: exit {proc.returncode}: {' '.join(cmd)}\n{out}\n{err}")
    return out


def demo(mode: str, opts: argparse.Namespace, cwd: str, number: int) -> dict:
    """One demo run in ``mode`` with a fresh root under /dev/shm; its timing line plus its checksum."""
    root = tempfile.mkdtemp(prefix="hpcckpt-bench-", dir="/dev/shm")
    try:
        cmd = [find_mpiexec(), "-n", str(opts.ranks), sys.executable, "-m", "hpcckpt.demo", *MODES[mode],
               "--steps", str(opts.steps), "--nx", str(opts.nx), "--ny", str(opts.ny),
               "--particles", str(opts.particles), "--checkpoint-every", str(opts.checkpoint_every),
               "--root", root, "--name", f"bench{number}"]
        lines = run(cmd, cwd, opts.timeout).splitlines()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    timing = json.loads(next(line for line in lines if line.startswith("timing: "))[len("timing: "):])
    return {**timing, "checksum": lines[-1].removeprefix("checksum: ")}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians per mode, overheads against ``none``, time per save and the h5py/hpcckpt ratio."""
    med = {m: {"elapsed": statistics.median(r["elapsed"] for r in rs),
               "per_save": statistics.median(r["t_save"] / r["n_save"] if r["n_save"] else 0.0 for r in rs)}
           for m, rs in runs.items()}
    base = med["none"]["elapsed"]
    for m in med:
        med[m]["overhead"] = med[m]["elapsed"] / base - 1
    ratio = med["h5py"]["per_save"] / med["hpcckpt"]["per_save"]
    npy = med["npy"]["per_save"] / med["hpcckpt"]["per_save"]
    passed = {"overhead": med["hpcckpt"]["overhead"] <= GOALS["max_overhead"],
              "h5py_over_hpcckpt": ratio >= GOALS["min_h5py_over_hpcckpt"],
              "npy_over_hpcckpt": npy >= GOALS["min_npy_over_hpcckpt"]}
    return {"median": med, "h5py_over_hpcckpt": ratio, "npy_over_hpcckpt": npy, "pass": passed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=len(os.sched_getaffinity(0)),
                    help="default: one rank per CPU, as HPC jobs run; more measures the OS scheduler too")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nx", type=int, default=512)
    ap.add_argument("--ny", type=int, default=512)
    ap.add_argument("--particles", type=int, default=100_000)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per demo run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    opts = ap.parse_args(argv)

    cwd = tempfile.mkdtemp(prefix="hpcckpt-bench-cwd-")  # never the source tree: import the installed package
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        for i in range(opts.repeats):
            for mode in MODES:
                r = demo(mode, opts, cwd, i)
                runs[mode].append(r)
                print(f"repeat {i + 1}/{opts.repeats} {mode:8s} elapsed {r['elapsed']:.3f} s, "
                      f"{r['t_save']:.3f} s in {r['n_save']} saves", flush=True)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)   # runs that end well leave no MPICH segment; nothing else is removed

    checksums = {r["checksum"] for rs in runs.values() for r in rs}
    summary = summarize(runs)
    summary["pass"]["checksums_equal"] = len(checksums) == 1
    params = {k: getattr(opts, k) for k in ("ranks", "steps", "nx", "ny", "particles", "checkpoint_every", "repeats")}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"params": params, "goals": GOALS, **summary, "checksums": sorted(checksums),
                                    "runs": runs}, indent=1) + "\n")

    print(f"\n{'mode':8s} {'elapsed s':>9s} {'overhead':>9s} {'ms/save':>8s}")
    for m, s in summary["median"].items():
        print(f"{m:8s} {s['elapsed']:9.3f} {s['overhead']:+9.1%} {s['per_save'] * 1e3:8.2f}")
    p = summary["pass"]
    print(f"overhead {summary['median']['hpcckpt']['overhead']:+.1%} (goal <= {GOALS['max_overhead']:.0%}): "
          f"{'PASS' if p['overhead'] else 'FAIL'}")
    print(f"h5py / hpcckpt time per save {summary['h5py_over_hpcckpt']:.1f}x "
          f"(goal >= {GOALS['min_h5py_over_hpcckpt']:.0f}x): {'PASS' if p['h5py_over_hpcckpt'] else 'FAIL'}")
    print(f"np.save + fsync + Allreduce / hpcckpt time per save {summary['npy_over_hpcckpt']:.2f}x "
          f"(goal >= {GOALS['min_npy_over_hpcckpt']:.0f}x): {'PASS' if p['npy_over_hpcckpt'] else 'FAIL'}")
    print(f"checksums equal: {'PASS' if p['checksums_equal'] else 'FAIL'}; wrote {opts.out}")
    return 0 if all(p.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
