"""Bytes each rank moves through collectives to open a job and to agree on a checkpoint; what
the deadline machinery costs a checkpoint; how long one rank's exception takes to end a job.

    python benchmarks/bench_vote.py                # at 2, 4, 8 and 16 ranks (oversubscribed)

Each rank's communicator is wrapped in a counter of the bytes it hands to and receives from
every collective (buffers as they are, pickled objects by their pickle). The old vote, an
Allgather of one row of doubles per rank, is counted beside it in the same run: what every
rank receives grows with N there, and stays flat with the reductions. (A checkpoint that
follows a new declaration of a distributed object also gathers the layouts to check their
tiling; it is left out, as it happens once per declaration.) Writes
benchmarks/results/vote.json.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


class Counting:
    """A communicator that counts the bytes of each collective call, then forwards it."""

    def __init__(self, comm):
        self._comm, self.bytes = comm, 0

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def Allreduce(self, send, recv, op=None):
        self.bytes += send.nbytes + recv.nbytes
        return self._comm.Allreduce(send, recv, op=op) if op is not None else self._comm.Allreduce(send, recv)

    def Iallreduce(self, send, recv, op=None):
        self.bytes += send.nbytes + recv.nbytes
        return self._comm.Iallreduce(send, recv, op=op)

    def Allgather(self, send, recv):
        self.bytes += send.nbytes + recv.nbytes
        return self._comm.Allgather(send, recv)

    def allgather(self, obj):
        out = self._comm.allgather(obj)
        self.bytes += len(pickle.dumps(obj)) + sum(len(pickle.dumps(o)) for o in out)
        return out

    def bcast(self, obj, root=0):
        out = self._comm.bcast(obj, root=root)
        self.bytes += len(pickle.dumps(out))
        return out

    def gather(self, obj, root=0):
        out = self._comm.gather(obj, root=root)
        self.bytes += len(pickle.dumps(obj)) + (sum(len(pickle.dumps(o)) for o in out) if out else 0)
        return out


def rank_part(root: str) -> None:
    import numpy as np
    from mpi4py import MPI
    import hpcckpt
    comm = Counting(MPI.COMM_WORLD)
    heap = hpcckpt.open("vote", comm, root=root, capacity="16MiB")
    opened = comm.bytes
    a = heap.array("a", 1000)
    heap.checkpoint(step=0)                  # after a new declaration: the tiling check gathers layouts
    comm.bytes = 0
    for step in range(1, 11):
        a[:] = step
        heap.checkpoint(step=step)
    per_checkpoint = comm.bytes / 10
    row = np.zeros(19)                       # the old vote: one row of 19 doubles per rank, all gathered
    table = np.empty((comm.Get_size(), row.size))
    comm.bytes = 0
    comm.Allgather(row, table)
    old = comm.bytes
    times = vote_times(heap, a, comm._comm)
    heap.close()
    out = comm._comm.gather((opened, per_checkpoint, old))
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "open_bytes_max": max(o[0] for o in out),
                          "checkpoint_bytes_max": max(o[1] for o in out), "old_vote_bytes": max(o[2] for o in out),
                          **times}))


def vote_times(heap, a, comm, rounds: int = 15, per_round: int = 200) -> dict:
    """Median time of a checkpoint (one element written) with the deadline machinery (a
    nonblocking vote tested in a loop) and without it (HPCCKPT_TIMEOUT=0: the blocking
    Allreduce of before), alternating in rounds, so that both see the same machine."""
    import statistics
    from mpi4py import MPI
    from hpcckpt import deadline
    got = {"blocking": [], "deadline": []}
    for _ in range(rounds):
        for mode, limit in (("blocking", 0), ("deadline", 600)):
            deadline.set_timeout(limit)
            comm.Barrier()
            t = MPI.Wtime()
            for i in range(per_round):
                a[0] = i
                heap.checkpoint()
            got[mode].append((MPI.Wtime() - t) / per_round)
    deadline.set_timeout(None)
    med = {m: comm.allreduce(statistics.median(v), op=MPI.MAX) for m, v in got.items()}
    return {"checkpoint_s_blocking": med["blocking"], "checkpoint_s_deadline": med["deadline"],
            "deadline_over_blocking": med["deadline"] / med["blocking"]}


RAISE = """
import sys, time, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
heap = hpcckpt.open("fail", comm, root=sys.argv[1], capacity="16MiB")
heap.array("a", 100)
heap.checkpoint(step=0)
if comm.rank == comm.size - 1:
    open(sys.argv[1] + "/raised", "w").write(repr(time.time()))
    raise ValueError("one rank fails")
heap.checkpoint(step=1)
"""


def exception_to_end(n: int = 4, repeats: int = 3) -> list[float]:
    """Seconds from an uncaught exception on the last rank to the end of mpiexec, while the
    other ranks wait in a checkpoint's vote."""
    import time
    took = []
    for _ in range(repeats):
        root = tempfile.mkdtemp(prefix="hpcckpt-fail-", dir="/dev/shm")
        try:
            subprocess.run(["mpiexec", "-n", str(n), sys.executable, "-c", RAISE, root], capture_output=True,
                           text=True, timeout=600)
            ended = time.time()
            with open(os.path.join(root, "raised")) as f:
                took.append(ended - float(f.read()))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return took


def main() -> int:
    rows = []
    for n in (2, 4, 8, 16):
        root = tempfile.mkdtemp(prefix="hpcckpt-vote-", dir="/dev/shm")
        try:
            out = subprocess.run(["mpiexec", "-n", str(n), sys.executable, __file__, "--rank-part", root],
                                 capture_output=True, text=True, timeout=600, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    import statistics
    failure = exception_to_end()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "vote.json"), "w") as f:
        json.dump({"ranks": rows, "exception_to_end_s_4_ranks": failure}, f, indent=1)
    flat = rows[-1]["checkpoint_bytes_max"] <= rows[0]["checkpoint_bytes_max"] * 1.01
    print(f"  {'PASS' if flat else 'FAIL'}  checkpoint vote bytes per rank at 16 / at 2 ranks: "
          f"{rows[-1]['checkpoint_bytes_max'] / rows[0]['checkpoint_bytes_max']:.2f} (<= 1)")
    two = rows[0]["deadline_over_blocking"]
    others = ", ".join(f"{r['deadline_over_blocking']:.2f}" for r in rows[1:])
    cheap = two <= 1.05
    print(f"  {'PASS' if cheap else 'FAIL'}  checkpoint with deadlines / blocking vote at 2 ranks: {two:.3f} (<= 1.05); "
          f"at 4, 8, 16 ranks (oversubscribed): {others}")
    fast = statistics.median(failure) <= 2.0
    print(f"  {'PASS' if fast else 'FAIL'}  exception on one rank to the end of the job at 4 ranks: "
          f"median {statistics.median(failure):.2f} s of {', '.join(f'{t:.2f}' for t in failure)} (<= 2 s)")
    return 0 if flat and cheap and fast else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-part":
        rank_part(sys.argv[2])
    else:
        sys.exit(main())
