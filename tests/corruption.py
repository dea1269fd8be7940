"""The seeded corruption campaign: damage copies of reference heaps and open them.

    python tests/corruption.py --seed 1 --trials 400      # one JSON line per trial
    python tests/corruption.py --fuzz --trials 400        # arbitrary bytes to open, info, verify

Reference heaps are built with several checkpoints, frees, and pools of 64 and 256 B,
then closed cleanly ("clean") or dropped as a crash would ("killed").  Each trial copies
one, applies one fault (a bit flip, a random byte, 512 zeroed bytes, or a truncation) at an
offset drawn over one region of layout.h or over the whole file, then opens it.  The open
must return the last epoch exactly, or the epoch before it with a RepairWarning (a
consistent rollback), or raise a HeapError that names the file.  Then a new array must be
zero, and a close and reopen must return the same.  `verify` must fail on every damage that
makes the open differ or refuse.  Runs in its own process, so that the test that drives it
sees a crash or a hang as one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

import hpcckpt

PAGE = 4096
P256 = np.dtype(("f8", 32))                                   # a sub-array dtype: 256 B
P64 = np.dtype([("k", "<u8"), ("v", ">f4", (14,))])           # 64 B, mixed byte order


def snapshot(heap: hpcckpt.Heap) -> dict:
    """Every object's dtype, shape and bytes, and the metadata."""
    out = {}
    for name in heap:
        obj = heap[name]
        if isinstance(obj, hpcckpt.Pool):
            data = obj.take(np.arange(len(obj)))
            out[name] = ("pool", obj.dtype.descr, len(obj), data.tobytes())
        else:
            out[name] = ("array", obj.dtype.descr, obj.shape, obj.tobytes())
    return {"objects": out, "epoch": heap.epoch, "meta": heap.meta}


def build(path: str, kind: str) -> tuple[dict, dict]:
    """A reference heap; the expected open result and the allowed rollback."""
    rng = np.random.default_rng(7)
    heap = hpcckpt.Heap.create(path, "1MiB", max_objects=64)
    grid = heap.array("grid", (40, 40))
    small = heap.array("small", 5, "f4")
    p64 = heap.pool("p64", P64, 50)
    p256 = heap.pool("p256", P256, 20)
    tmp = heap.array("tmp", 300, "i8")
    grid[:] = rng.random((40, 40))
    small[:] = rng.random(5)
    p64.put(np.arange(50), np.frombuffer(rng.bytes(64 * 50), P64))
    p256.put(np.arange(20), rng.random((20, 32)))
    tmp[:] = np.arange(300)
    heap.checkpoint(step=1)
    states = [snapshot(heap)]
    for step in (2, 3, 4):
        grid[step * 5:step * 5 + 3] += step
        p64.put([step, 10 + step], p64.take([0, 1]))
        p256[step][:] = step
        small[step] = -step
        if step == 2:
            del heap["tmp"]
            heap.array("late", 100, "u2")[:] = 9
        if step == 3:
            del heap["late"]
            heap.array("late2", 2000, "u1")[:] = 3
        heap.checkpoint(step=step)
        states.append(snapshot(heap))
    grid[0] = -1.0                                             # written after the last checkpoint
    p64.put([49], p64.take([48]))
    if kind == "clean":
        heap.close()                                           # seals: a local epoch with the last meta
        heap = hpcckpt.Heap.open(path)
        states.append(snapshot(heap))
        heap.close()
    else:
        heap._native.abandon()
    return states[-1], states[-2]


def regions(path: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each region of layout.h in this file, from its superblock."""
    sb = np.fromfile(path, "<u8", 512, offset=0)
    off_catalog, off_data, shadow_a, shadow_b, size = (int(x) for x in sb[6:11])
    used = min(off_catalog + 16 * 512, off_data)
    return [("superblock", 0, PAGE), ("state", PAGE, 5 * PAGE), ("superblock twin", 5 * PAGE, 6 * PAGE),
            ("catalog (used)", off_catalog, used), ("catalog", off_catalog, off_data),
            ("data (used)", off_data, off_data + 64 * PAGE), ("data", off_data, shadow_a),
            ("shadow A (used)", shadow_a, shadow_a + 64 * PAGE), ("shadow B (used)", shadow_b, shadow_b + 64 * PAGE),
            ("shadow A", shadow_a, shadow_b), ("shadow B", shadow_b, size), ("whole file", 0, size)]


def damage(path: str, rng: np.random.Generator, regs: list) -> str:
    """Apply one fault; say what it was."""
    name, lo, hi = regs[rng.integers(len(regs))]
    fault = ("flip", "byte", "zero512", "truncate")[rng.integers(4)]
    at = int(rng.integers(lo, hi))
    with open(path, "r+b") as f:
        if fault == "truncate":
            f.truncate(at)
        elif fault == "zero512":
            f.seek(at)
            f.write(bytes(min(512, hi - at)))
        else:
            f.seek(at)
            old = f.read(1)[0]
            new = old ^ (1 << int(rng.integers(8))) if fault == "flip" else int(rng.integers(256))
            f.seek(at)
            f.write(bytes([new]))
    return f"{fault} at {at} ({name})"


def verify_ok(path: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heap = hpcckpt.Heap.open(path, readonly=True)
            try:
                heap.verify()
            finally:
                heap.close()
        return True
    except hpcckpt.HeapError:
        return False


def trial(path: str, expect: dict, rollback: dict) -> str:
    """Open a damaged heap: 'exact', 'repaired', 'rollback', 'refused', or raise AssertionError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            heap = hpcckpt.Heap.open(path)
        except hpcckpt.HeapError as e:
            assert path in str(e), f"the error does not name the file: {e}"
            return "refused"
        try:
            got = snapshot(heap)
            warned = any(issubclass(w.category, hpcckpt.RepairWarning) for w in caught)
            if got != expect:
                assert got == rollback, "wrong data: neither the last epoch nor a consistent rollback"
                assert warned, "rolled back without a warning"
            fresh = heap.array("fresh", 3000, "u1")
            assert not fresh.any(), "a new array is not zero"
            del heap["fresh"]
            heap.close()
            again = hpcckpt.Heap.open(path)
            assert snapshot(again)["objects"] == got["objects"], "a close and reopen changed the data"
            again.close()
        finally:
            heap._native.abandon()
        return "rollback" if got != expect else "repaired" if warned else "exact"


def fuzz_input(path: str, ref: str, rng: np.random.Generator) -> str:
    """Random bytes, a heap's head followed by random bytes, or a heap with many random mutations."""
    how = ("random", "head", "mutated")[rng.integers(3)]
    data = bytearray(open(ref, "rb").read())
    if how == "random":
        data = bytearray(rng.bytes(int(rng.integers(0, 3 * PAGE))))
    elif how == "head":
        cut = int(rng.integers(8, 8 * PAGE))
        data = data[:cut] + bytearray(rng.bytes(len(data) - cut))
    else:
        for _ in range(int(rng.integers(2, 200))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    with open(path, "wb") as f:
        f.write(data)
    return how


def fuzz(path: str) -> str:
    """Open, info and verify must answer arbitrary bytes with a HeapError or OSError, never anything else."""
    from hpcckpt.cli import main as cli
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hpcckpt.Heap.open(path).close()
            outcome = "opened"
        except (hpcckpt.HeapError, OSError):
            outcome = "refused"
        for cmd in ("info", "verify"):
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert cli([cmd, path]) in (0, 1), f"hpcckpt {cmd} gave an unexpected exit code"
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--fuzz", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="hpcckpt-corrupt-", dir="/dev/shm")
    try:
        if args.fuzz:
            ref = os.path.join(work, "fuzz.ref")
            build(ref, "clean")
            for i in range(args.trials):
                path = os.path.join(work, "fuzz.heap")
                how = fuzz_input(path, ref, rng)
                print(json.dumps({"trial": i, "fault": how, "started": True}), flush=True)
                try:
                    outcome, err = fuzz(path), None
                except AssertionError as e:
                    outcome, err = "WRONG", str(e)
                print(json.dumps({"trial": i, "fault": how, "outcome": outcome, "error": err}), flush=True)
            return 0
        refs = {}
        for kind in ("clean", "killed"):
            ref = os.path.join(work, f"{kind}.ref")
            refs[kind] = (ref, *build(ref, kind), regions(ref))
        for i in range(args.trials):
            kind = ("clean", "killed")[i % 2]
            ref, expect, rollback, regs = refs[kind]
            path = os.path.join(work, "trial.heap")
            shutil.copyfile(ref, path)
            what = damage(path, rng, regs)
            print(json.dumps({"trial": i, "kind": kind, "fault": what, "started": True}), flush=True)
            damaged = path + ".damaged"
            shutil.copyfile(path, damaged)
            try:
                outcome = trial(path, expect, rollback)
                if outcome != "exact":
                    assert not verify_ok(damaged) or outcome == "repaired", \
                        f"verify passed a heap whose open was {outcome}"
                err = None
            except AssertionError as e:
                outcome, err = "WRONG", str(e)
            print(json.dumps({"trial": i, "kind": kind, "fault": what, "outcome": outcome, "error": err}), flush=True)
            os.unlink(damaged)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
