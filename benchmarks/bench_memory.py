"""Allocation, first checkpoint and reopen after a crash against numpy/memcpy (issue 23).

    python benchmarks/bench_memory.py                # 1M x 64 B, 1M x 256 B, 1 GiB; ~5 minutes
    python benchmarks/bench_memory.py --quick        # 1/8 of the sizes, for a smoke run
    python benchmarks/bench_memory.py --only alloc   # or: reopen
    python benchmarks/bench_memory.py --against REV [REV ...]  # and the trees at git REVs, in the same rounds

Every heap lives on tmpfs (/dev/shm) with the default tracker; every figure is taken beside
its baseline in the same round (baseline and subject alternate, rounds repeated; medians and
ranges are reported), because the machines are noisy.

- ``alloc``: a pool of 1M objects of 64 B, of 256 B, and an array of 1 GiB: the allocation
  (``heap.pool`` / ``heap.array``) against ``np.ones`` of the same bytes; then the fill
  (``pool.put`` of every record / ``a[:] = 1``), the first checkpoint, and a second one after
  1 % of the objects were rewritten (so a page fault pushed out of the first checkpoint into
  the second would show); allocate + fill + first checkpoint against ``np.ones`` +
  ``np.copyto`` into fresh memory of the same bytes.
- ``reopen``: a 1 GiB array, committed, then every page (or 1 % of the pages) written and the
  process SIGKILLed; ``Heap.open`` (which restores the committed epoch) against
  ``np.copyto`` of the heap's live bytes between two warm arrays.

With ``--against REV ...`` the heap side runs in child processes over trees built the same way
(``cc -O2``, this tree's and each REV's ``src`` and ``native``), one after the other in each round.

Prints PASS/FAIL per goal and writes benchmarks/results/memory.json.
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
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run_core import goal, save  # noqa: E402

import hpcckpt  # noqa: E402

TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") else None
ROOT = os.path.dirname(HERE)

# A child over another tree: the editable install's finder would import this checkout instead.
PRELUDE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Mesonpy' not in type(f).__name__]; "
           "sys.path.insert(0, {src!r}); sys.path.insert(1, {here!r}); ")


def build_tree(rev: str | None, workdir: str) -> str:
    """`src` of the tree at git `rev` (None: this working tree) with its extension built by cc."""
    import sysconfig
    tree = os.path.join(workdir, rev or "now")
    os.makedirs(tree)
    if rev:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "src", "native"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    else:
        shutil.copytree(os.path.join(ROOT, "src"), os.path.join(tree, "src"))
        shutil.copytree(os.path.join(ROOT, "native"), os.path.join(tree, "native"))
    native = os.path.join(tree, "native")
    srcs = [os.path.join(native, f) for f in sorted(os.listdir(native)) if f.endswith(".c")]
    out = os.path.join(tree, "src", "hpcckpt", "_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-std=gnu11", f"-I{native}", f"-I{native}/include",
                    f"-I{sysconfig.get_paths()['include']}", os.path.join(tree, "src", "hpcckpt", "_native.c"), *srcs,
                    "-o", out], check=True)
    return os.path.join(tree, "src")


def in_tree(src: str | None, code: str, *args: str, killed: bool = False) -> str:
    """Run `code` in a child python over tree `src` (None: this checkout as installed); its stdout.
    killed: the child ends by SIGKILL."""
    prelude = PRELUDE.format(src=src, here=HERE) if src else ""
    p = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True)
    if p.returncode != (-9 if killed else 0):
        raise SystemExit(f"bench_memory: a child failed:\n{p.stderr}")
    return p.stdout


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(xs: list[float]) -> dict:
    return {"median_ms": med(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}


def show(xs: list[float]) -> str:
    return f"{med(xs) * 1e3:8.1f} ms [{min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f}]"


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def case_list(quick: bool) -> list[tuple[str, int, int]]:
    """(name, object bytes, count): 1M x 64 B, 1M x 256 B, one array of 1 GiB."""
    n = (1 << 20) // (8 if quick else 1)
    return [(f"{n // 1024}K x 64 B pool" if quick else "1M x 64 B pool", 64, n),
            (f"{n // 1024}K x 256 B pool" if quick else "1M x 256 B pool", 256, n),
            (f"{(1 << 30) // (8 if quick else 1) >> 20} MiB array", 0, (1 << 30) // (8 if quick else 1))]


def subject(work: str, size: int, count: int, rng) -> dict:
    """Allocate, fill, first checkpoint, 1 % rewritten and a second checkpoint, in a fresh heap."""
    path = os.path.join(work, "m.heap")
    nbytes = count if size == 0 else size * count
    cap = nbytes + (nbytes // 8 if size else 0) + (64 << 20)    # + tags of the pool's units
    heap = hpcckpt.Heap.create(path, capacity=cap)
    out = {}
    if size == 0:
        out["alloc"], a = timed(lambda: heap.array("a", count // 8, "f8"))
        out["fill"], _ = timed(lambda: a.__setitem__(slice(None), 1.0))
        out["ckpt1"], _ = timed(heap.checkpoint)
        pages = a.reshape(-1, 512)
        idx = rng.choice(pages.shape[0], pages.shape[0] // 100, replace=False)
        pages[idx, 0] += 1.0
        out["ckpt2"], _ = timed(heap.checkpoint)
        ok = a[0] in (1.0, 2.0) and float(a.sum()) == count // 8 + idx.size
    else:
        dt = np.dtype([("key", "<u8"), ("pad", "u1", (size - 8,))])
        src = np.zeros(count, dt)
        src["key"] = np.arange(count)
        out["alloc"], pool = timed(lambda: heap.pool("p", dt, count))
        out["fill"], _ = timed(lambda: pool.put(np.arange(count), src))
        out["ckpt1"], _ = timed(heap.checkpoint)
        idx = np.sort(rng.choice(count, count // 100, replace=False))
        src["key"][idx] += count
        pool.put(idx, src[idx])
        out["ckpt2"], _ = timed(heap.checkpoint)
        ok = np.array_equal(pool.take(idx[:1000])["key"], src["key"][idx[:1000]])
    assert ok, "contents differ"
    heap.close()
    os.unlink(path)
    return out


SUBJECT = ("import json, sys, numpy as np, bench_memory; "
           "print(json.dumps(bench_memory.subject(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "
           "np.random.default_rng(int(sys.argv[4])))))")


def baseline(nbytes: int) -> dict:
    """np.ones of the bytes, and np.copyto of them into fresh memory: as numpy does it (it asks
    for transparent huge pages), and with pages of 4 KiB, the only ones a heap on a tmpfs
    mounted without ``huge=`` (like /dev/shm here) can get ("ones4k", "copyto4k")."""
    from numpy._core.multiarray import _set_madvise_hugepage
    out = {}
    for suffix, huge in (("", True), ("4k", False)):
        was = _set_madvise_hugepage(huge)
        try:
            t_ones, a = timed(lambda: np.ones(nbytes, np.uint8))
            t0 = time.perf_counter()
            b = np.empty_like(a)
            np.copyto(b, a)
            out["copyto" + suffix] = time.perf_counter() - t0
            out["ones" + suffix] = t_ones
            del a, b
        finally:
            _set_madvise_hugepage(was)
    return out


def part_alloc(work: str, quick: bool, reps: int, trees: dict) -> tuple[dict, list]:
    rng, out, goals = np.random.default_rng(23), {}, []
    for name, size, count in case_list(quick):
        nbytes = count if size == 0 else size * count
        runs: dict[str, dict[str, list[float]]] = {"numpy": {"ones": [], "copyto": [], "ones4k": [], "copyto4k": []}}
        sides = [("numpy", lambda: baseline(nbytes))]
        for label, src in trees.items():
            runs[label] = {k: [] for k in ("alloc", "fill", "ckpt1", "ckpt2")}
            if src is None and len(trees) == 1:
                sides.append((label, lambda: subject(work, size, count, rng)))
            else:
                sides.append((label, lambda src=src: json.loads(in_tree(src, SUBJECT, work, str(size), str(count),
                                                                        str(int(rng.integers(1 << 30)))))))
        for r in range(reps):   # the sides alternate, their order rotated every round
            for label, fn in sides[r % len(sides):] + sides[:r % len(sides)]:
                for k, v in fn().items():
                    runs[label][k].append(v)
        floor = [o + c for o, c in zip(runs["numpy"]["ones"], runs["numpy"]["copyto"])]
        floor4k = [o + c for o, c in zip(runs["numpy"]["ones4k"], runs["numpy"]["copyto4k"])]
        print(f"  {name}:")
        print(f"    {'np.ones':36} {show(runs['numpy']['ones'])}")
        print(f"    {'np.copyto into fresh memory':36} {show(runs['numpy']['copyto'])}")
        print(f"    {'np.ones, 4 KiB pages':36} {show(runs['numpy']['ones4k'])}")
        print(f"    {'np.copyto, 4 KiB pages':36} {show(runs['numpy']['copyto4k'])}")
        out[name] = {"bytes": nbytes, "numpy": {k: ms(v) for k, v in runs["numpy"].items()}, "ones_copyto": ms(floor),
                     "ones_copyto_4k": ms(floor4k)}
        for label in trees:
            t = runs[label]
            first = [a + f + c for a, f, c in zip(t["alloc"], t["fill"], t["ckpt1"])]
            for k, what in (("alloc", "allocate"), ("fill", "fill"), ("ckpt1", "first checkpoint"),
                            ("ckpt2", "second checkpoint (1 % rewritten)")):
                print(f"    {label:>7} {what:28} {show(t[k])}")
            print(f"    {label:>7} {'allocate + fill + first ckpt':28} {show(first)}")
            r_alloc, r_first = med(t["alloc"]) / med(runs["numpy"]["ones"]), med(first) / med(floor)
            r_first4k = med(first) / med(floor4k)
            print(f"    {label:>7} allocate + fill + first ckpt / numpy with 4 KiB pages: {r_first4k:.2f}x")
            out[name][label] = {k: ms(v) for k, v in t.items()}
            out[name][label].update({"alloc_fill_ckpt1": ms(first), "alloc_over_ones": r_alloc,
                                     "first_over_floor": r_first, "first_over_floor_4k": r_first4k})
            if label == "now":
                goals.append(goal(f"{name}: allocate / np.ones", r_alloc, 0.1, False))
                goals.append(goal(f"{name}: allocate + fill + first checkpoint / (np.ones + np.copyto)", r_first,
                                  2.5, False))
    return out, goals


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, hpcckpt
    path, nbytes, frac = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    heap = hpcckpt.Heap.create(path, capacity=nbytes + (64 << 20))
    a = heap.array("a", nbytes // 8, "f8")
    a[:] = 1.0
    heap.checkpoint()
    pages = a.reshape(-1, 512)
    if frac >= 1:
        pages[:, 0] = 2.0
    else:
        idx = np.random.default_rng(1).choice(pages.shape[0], int(pages.shape[0] * frac), replace=False)
        pages[idx, 0] = 2.0
    os.kill(os.getpid(), signal.SIGKILL)
""")


OPEN = ("import json, sys, time, hpcckpt; t = time.perf_counter(); h = hpcckpt.Heap.open(sys.argv[1]); "
        "t = time.perf_counter() - t; a = h['a']; "
        "assert h.epoch == 1 and float(a[::512].max()) == 1.0, 'not the committed epoch'; h.close(); print(t)")


def part_reopen(work: str, quick: bool, reps: int, trees: dict) -> tuple[dict, list]:
    nbytes = (1 << 30) // (8 if quick else 1)
    src, dst = np.ones(nbytes, np.uint8), np.full(nbytes, 2, np.uint8)   # both mapped in
    out, goals = {}, []
    for frac in (1.0, 0.01):
        topen, tcopy = {label: [] for label in trees}, []
        label_f = "every page written" if frac >= 1 else f"{frac:.0%} of the pages written"
        for r in range(reps):
            t, _ = timed(lambda: np.copyto(dst, src))
            tcopy.append(t)
            for label, tree in list(trees.items())[r % len(trees):] + list(trees.items())[:r % len(trees)]:
                path = os.path.join(work, "r.heap")
                in_tree(tree, CHILD, path, str(nbytes), str(frac), killed=True)
                if tree is None and len(trees) == 1:
                    t, heap = timed(lambda: hpcckpt.Heap.open(path))
                    a = heap["a"]
                    assert heap.epoch == 1 and float(a[::512].max()) == 1.0, "not the committed epoch"
                    heap.close()
                else:
                    t = float(in_tree(tree, OPEN, path))
                topen[label].append(t)
                os.unlink(path)
        out[label_f] = {"memcpy": ms(tcopy), "bytes": nbytes}
        print(f"  reopen after SIGKILL, {nbytes >> 20} MiB, {label_f}: memcpy of the live bytes {show(tcopy)}")
        for label in trees:
            ratio = med(topen[label]) / med(tcopy)
            print(f"    {label:>7} open {show(topen[label])}: {ratio:.2f}x the memcpy")
            out[label_f][label] = {"open": ms(topen[label]), "ratio": ratio}
            if label == "now":
                goals.append(goal(f"reopen after a crash, {label_f} / memcpy of the live bytes", ratio, 1.5, False))
    return out, goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=["alloc", "reopen"])
    ap.add_argument("--against", metavar="REV", nargs="+", help="also the trees at these git revisions, in the same rounds")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-memory-", dir=TMPFS)
    results, goals = {"quick": args.quick, "reps": args.reps, "tmpfs": TMPFS is not None, "against": args.against}, []
    trees: dict[str, str | None] = {"now": None}
    try:
        if args.against:
            build = tempfile.mkdtemp(prefix="bench-memory-build-")
            trees = {"now": build_tree(None, build), **{rev: build_tree(rev, build) for rev in args.against}}
        for name, fn in (("alloc", part_alloc), ("reopen", part_reopen)):
            if args.only and name not in args.only:
                continue
            print(f"{name}:", flush=True)
            res, g = fn(work, args.quick, args.reps, trees)
            results[name] = res
            goals += g
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.against:
            shutil.rmtree(build, ignore_errors=True)
    results["goals"] = goals
    save("memory", results)


if __name__ == "__main__":
    main()
