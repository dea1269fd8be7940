"""Bytes each rank moves through collectives to open a job and to agree on a checkpoint.

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
    heap.close()
    out = comm._comm.gather((opened, per_checkpoint, old))
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "open_bytes_max": max(o[0] for o in out),
                          "checkpoint_bytes_max": max(o[1] for o in out), "old_vote_bytes": max(o[2] for o in out)}))


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
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "vote.json"), "w") as f:
        json.dump(rows, f, indent=1)
    flat = rows[-1]["checkpoint_bytes_max"] <= rows[0]["checkpoint_bytes_max"] * 1.01
    print(f"  {'PASS' if flat else 'FAIL'}  checkpoint vote bytes per rank at 16 / at 2 ranks: "
          f"{rows[-1]['checkpoint_bytes_max'] / rows[0]['checkpoint_bytes_max']:.2f} (<= 1)")
    return 0 if flat else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-part":
        rank_part(sys.argv[2])
    else:
        sys.exit(main())
