"""The README's example, runnable: a heat-diffusion stencil whose grid is a distributed
heap array, checkpointed every 10 steps, exported to HDF5 every 5th checkpoint.

    hpcckpt run -n 2 -- python examples/stencil.py --steps 200 --export-dir /tmp/ckpt

Kill a rank at any moment: `hpcckpt run` relaunches the job, which resumes from its last
checkpoint and ends with the same checksum as a run that was never killed.  Remove the heaps and
run it on another number of ranks: it resumes from the export with the same answer.
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI

import hpcckpt

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=256, help="global grid is n x n")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--root", default=None, help="heap root (default: $HPCCKPT_ROOT or /dev/shm/hpcckpt-$USER)")
ap.add_argument("--export-dir", default=None)
args = ap.parse_args()

comm = MPI.COMM_WORLD
n, up, down = args.n, comm.rank - 1, comm.rank + 1
rows = np.array_split(np.arange(n), comm.size)[comm.rank]               # this rank's rows of the grid
heap = hpcckpt.open("stencil", comm, root=args.root, capacity="256MiB",  # collective
                    export_dir=args.export_dir, export_every=5 if args.export_dir else 0)
u = heap.array("u", (len(rows) + 2, n), "f8", halo=(1, 0),              # the array IS the object:
               global_shape=(n, n), offset=(int(rows[0]), 0))           # a block of a global array
mine = np.array_split(np.arange(1000), comm.size)[comm.rank]            # global sizes never depend on
cells = heap.pool("cells", [("x", "f8"), ("n", "i4")], len(mine),       # comm.size: the job restarts
                  global_count=1000, offset=int(mine[0]))               # on any number of ranks
if not heap.kernel_writable:
    heap.expose("u")                     # MPI receives into u's halo rows (see README "Trackers")
start = heap.meta["step"] if heap.epoch is not None else 0               # where to resume
if start == 0:
    u[1:-1, :] = np.sin(rows[:, None] * 0.1) * np.cos(np.arange(n) * 0.05)
for step in range(start + 1, args.steps + 1):
    if up >= 0:                          # halo exchange straight into the heap array
        comm.Sendrecv(u[1], dest=up, recvbuf=u[0], source=up)
    if down < comm.size:
        comm.Sendrecv(u[-2], dest=down, recvbuf=u[-1], source=down)
    inner = u[1:-1]
    lap = np.zeros_like(inner)
    lap[:, 1:-1] = inner[:, :-2] + inner[:, 2:] - 2 * inner[:, 1:-1]
    lo, hi = (1 if up < 0 else 0), (len(rows) - 1 if down >= comm.size else len(rows))
    lap[lo:hi] += u[lo:hi] + u[lo + 2:hi + 2] - 2 * inner[lo:hi]
    inner += 0.2 * lap
    due = np.flatnonzero(mine % 10 == step % 10)                        # a few cells change each step
    cells.put(due, step * 0.5 + cells.take(due)["x"], field="x")
    if step % 10 == 0:
        heap.checkpoint(step=step)       # collective: commits one global epoch
        if comm.rank == 0:
            print(f"step {step}: copied {heap.stats['total']['bytes_copied']} bytes", flush=True)
blocks = comm.gather((np.ascontiguousarray(u[1:-1]).tobytes(), cells.take(np.arange(len(mine))).tobytes()))
if comm.rank == 0:                       # the grid, then the table, each in global order
    print("checksum:", hashlib.sha256(b"".join(b[0] for b in blocks) + b"".join(b[1] for b in blocks)).hexdigest(),
          flush=True)
heap.close()
