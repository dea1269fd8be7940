"""A process SIGKILLed at a random instant (mid-allocation, mid-free, mid-checkpoint, mid-wipe,
mid-recovery) reopens to exactly the state of the epoch it reports as committed."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import hpcckpt
from conftest import KERNEL_TRACKERS

# The child: a seeded workload that logs, before each prepare, the state the epoch will hold
# (fsynced), so that whatever epoch the heap comes back at, the expected state is known.
WORKLOAD = """
import hashlib, json, os, random, sys
import numpy as np, hpcckpt
path, tracker, seed, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
heap = hpcckpt.Heap.open(path, tracker=tracker) if os.path.exists(path) else \\
    hpcckpt.Heap.create(path, "8MiB", tracker=tracker, max_objects=4096)
rng = random.Random(seed)

def digest(obj):
    data = obj.take(np.arange(len(obj))) if isinstance(obj, hpcckpt.Pool) else obj
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()

with open(log, "a") as out:
    for step in range(100000):
        op, name = rng.random(), f"o{rng.randrange(40)}"
        if op < 0.25 and name not in heap:
            if rng.random() < 0.5:
                heap.array(name, rng.choice([3, 40, 300, 1500]), "f8")
            else:
                heap.pool(name, "i8", rng.choice([2, 100, 700]))
        elif op < 0.35 and name in heap:
            del heap[name]
        elif op < 0.9 and name in heap:
            obj = heap[name]
            if isinstance(obj, hpcckpt.Pool):
                idx = rng.sample(range(len(obj)), min(len(obj), 5))
                obj.put(idx, [rng.randrange(1 << 40) for _ in idx])
            else:
                obj[rng.randrange(len(obj)):] = rng.random()
        elif op >= 0.9:
            state = {n: digest(heap[n]) for n in heap}
            out.write(json.dumps({"epoch": (heap.epoch or 0) + 1, "state": state}) + "\\n")
            out.flush()
            os.fsync(out.fileno())
            heap.checkpoint(step=step)
"""


def digest_of(heap: hpcckpt.Heap) -> dict:
    import hashlib

    import numpy as np
    out = {}
    for name in heap:
        obj = heap[name]
        data = obj.take(np.arange(len(obj))) if isinstance(obj, hpcckpt.Pool) else obj
        out[name] = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
    return out


@pytest.mark.parametrize("tracker", KERNEL_TRACKERS + ["hash"])
def test_sigkill_at_random_instants_restores_exactly_a_committed_epoch(heap_dir, tracker):
    path, log = os.path.join(heap_dir, "h.heap"), os.path.join(heap_dir, "log.jsonl")
    script = os.path.join(heap_dir, "workload.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(WORKLOAD))
    rng = random.Random(f"kill-{tracker}")
    epochs_seen = set()
    for round_ in range(12):
        logged = os.path.getsize(log) if os.path.exists(log) else 0
        child = subprocess.Popen([sys.executable, script, path, tracker, str(round_), log],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            limit = time.monotonic() + 120     # the event: the heap is open and this round logs its first intent
            while (not os.path.exists(log) or os.path.getsize(log) == logged) and child.poll() is None:
                assert time.monotonic() < limit, "the workload never reached its first checkpoint"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.6))  # not synchronisation: where in the run the kill lands
            child.send_signal(signal.SIGKILL)
            _, err = child.communicate(timeout=60)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -9, err.decode()[-2000:]
        with hpcckpt.Heap.open(path, tracker=tracker) as heap:
            epoch = heap.epoch or 0
            expected = {}
            with open(log) as f:
                for line in f:
                    rec = json.loads(line)
                    if rec["epoch"] == epoch:
                        expected = rec["state"]   # the last intent logged for this epoch number
            assert digest_of(heap) == expected, f"round {round_}: heap at epoch {epoch} differs from its log"
            heap.verify()
            epochs_seen.add(epoch)
    assert len(epochs_seen) > 3                   # the kills really landed at different points
