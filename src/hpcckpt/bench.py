"""Measure what a checkpoint costs per tracker: the paper's experiment in small.

>>> rows = measure_trackers(count=2000, size=256, fraction=0.01, trackers=["hash", "full"])
>>> [r["tracker"] for r in rows], rows[0]["objects_dirty"]
(['hash', 'full'], 20)
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from .heap import TRACKERS, Heap, resolve_tracker


def available_trackers() -> list[str]:
    """Every tracker this kernel can run."""
    return [t for t in TRACKERS if t != "uffd" or resolve_tracker("auto") == "uffd"]


def measure_trackers(count: int, size: int, fraction: float, trackers: list[str] | None = None,
                     nvm_gbps: float = 0.0, repeats: int = 3, seed: int = 0) -> list[dict]:
    """One row per tracker: a pool of `count` objects of `size` bytes, `fraction` of them
    rewritten at random, then checkpointed; the best of `repeats` checkpoint times."""
    rows = []
    rng = np.random.default_rng(seed)
    ndirty = max(1, round(count * fraction))
    capacity = max(64 << 20, count * max(size, 64) * 2)
    for tracker in trackers or available_trackers():
        root = os.environ.get("HPCCKPT_ROOT") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        if root:
            os.makedirs(root, mode=0o700, exist_ok=True)
        d = tempfile.mkdtemp(prefix="hpcckpt-bench-", dir=root)   # where the heaps live: its speed is measured
        try:
            heap = Heap.create(os.path.join(d, "b.heap"), capacity, tracker=tracker, max_objects=1024)
            pool = heap.pool("objs", f"V{size}", count)
            heap.checkpoint()
            heap.set_nvm_model(nvm_gbps)
            best = None
            for r in range(repeats):
                for i in rng.choice(count, ndirty, replace=False).tolist():
                    pool[i][()] = bytes([r + 1]) * size
                t0 = time.perf_counter()
                heap.checkpoint()
                elapsed = time.perf_counter() - t0
                if best is None or elapsed < best[0]:
                    best = (elapsed, heap.stats)
            rows.append({"tracker": tracker, "count": count, "size": size, "fraction": fraction,
                         "nvm_gbps": nvm_gbps, "t_checkpoint": best[0], **best[1]})
            del pool
            heap.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return rows
