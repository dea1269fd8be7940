"""Particles that move between ranks, kept in a distributed hpcckpt table.

Particles drift across a periodic domain [0, 1) cut into one slab per rank; every step each
rank moves its particles, sends those that left its slab to their new owners (one Alltoallv),
removes them and appends the ones that arrived, deposits a charge field from its particles
(summed over the ranks) and pushes the particles with that field.  The particles are a table
of the heap: its length changes every step, a checkpoint copies what changed, and a restart on
another number of ranks routes every particle to the rank whose slab holds it.

    hpcckpt run -n 2 -- python examples/particles.py --steps 40 --export-dir /tmp/ckpt

Kill a rank at any moment: the relaunched job ends with the checksum of a run never killed.
Remove the heaps and run on another number of ranks: it resumes from the export.
``--dump FILE`` writes the particles of every rank (in rank order) at the end, and ``--load FILE``
starts from such a file instead of the initial state: the same state carried across by hand.
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI

import hpcckpt

ap = argparse.ArgumentParser()
ap.add_argument("--particles", type=int, default=20_000, help="particles in all")
ap.add_argument("--cells", type=int, default=64, help="cells of the charge field")
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--checkpoint-every", type=int, default=5)
ap.add_argument("--root", default=None, help="heap root (default: $HPCCKPT_ROOT or /dev/shm/hpcckpt-$USER)")
ap.add_argument("--export-dir", default=None)
ap.add_argument("--name", default="particles")
ap.add_argument("--redundancy", default="none", choices=["none", "partner"])
ap.add_argument("--dump", default=None, help="write every rank's particles here at the end (rank 0)")
ap.add_argument("--load", default=None, help="start from particles written by --dump")
args = ap.parse_args()

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size
PARTICLE = np.dtype([("x", "f8"), ("v", "f8"), ("w", "f8"), ("id", "i8")])
ROW = MPI.BYTE.Create_contiguous(PARTICLE.itemsize).Commit()
DT, QM = 0.05, -0.002


def owner(p: np.ndarray) -> np.ndarray:
    """The rank whose slab of [0, 1) holds each particle: the table's route."""
    return np.minimum((p["x"] * size).astype(np.int64), size - 1)


def exchange(leaving: np.ndarray) -> np.ndarray:
    """Send each leaving particle to its owner; return the arrivals, in source-rank order."""
    dest = owner(leaving)
    order = np.argsort(dest, kind="stable")
    send = np.ascontiguousarray(leaving[order])
    counts = np.bincount(dest, minlength=size).astype(np.int64)
    incoming = np.empty(size, np.int64)
    comm.Alltoall(counts, incoming)
    got = np.empty(int(incoming.sum()), PARTICLE)
    sd, rd = np.concatenate([[0], np.cumsum(counts)[:-1]]), np.concatenate([[0], np.cumsum(incoming)[:-1]])
    comm.Alltoallv([send.view(np.uint8), (counts.tolist(), sd.tolist()), ROW],
                   [got.view(np.uint8), (incoming.tolist(), rd.tolist()), ROW])
    return got


def initial() -> np.ndarray:
    """Every particle (deterministic), or those of --load; this rank keeps those of its slab."""
    if args.load:
        with np.load(args.load) as f:
            p = f["particles"]
    else:
        ids = np.arange(args.particles)
        p = np.zeros(ids.size, PARTICLE)
        p["x"], p["v"], p["id"] = (ids * 0.6180339887498949) % 1.0, 0.02 * np.sin(ids), ids
        p["w"] = 1.0 + 0.1 * np.cos(7.0 * ids)                 # sums depend on the order of the rows
    return p[owner(p) == rank]


heap = hpcckpt.open(args.name, comm, root=args.root, capacity="256MiB", export_dir=args.export_dir,
                    export_every=1 if args.export_dir else 0, redundancy=args.redundancy)
parts = heap.table("particles", PARTICLE, distributed=True, route=owner)   # collective
start = heap.meta["step"] if heap.epoch is not None else 0
if heap.epoch is None:
    parts.append(initial())
    if args.load:
        with np.load(args.load) as f:
            start = int(f["step"])
elif rank == 0:
    print(f"resumed at step {start} from the {heap.restored_from} level", flush=True)
field = np.zeros(args.cells)
for step in range(start + 1, args.steps + 1):
    p = parts.rows
    p["x"] = (p["x"] + p["v"] * DT) % 1.0                       # drift (periodic)
    gone = np.flatnonzero(owner(p) != rank)
    arrived = exchange(p[gone])
    parts.remove(gone)                                          # the last rows fill the holes
    parts.append(arrived)
    p = parts.rows
    cell = np.minimum((p["x"] * args.cells).astype(np.int64), args.cells - 1)
    mine = np.bincount(cell, weights=p["w"], minlength=args.cells)
    comm.Allreduce(mine, field, op=MPI.SUM)                     # the charge density, on every rank
    efield = np.roll(field, 1) - np.roll(field, -1)
    p["v"] += QM * efield[cell] * DT                            # push
    if step % args.checkpoint_every == 0:
        heap.checkpoint(step=step)
        if rank == 0:
            print(f"step {step}: {heap.stats['total']['bytes_copied']} bytes copied", flush=True)
if args.export_dir and heap.epoch:
    heap.export()   # the last epoch too: a background export that fell due while one ran was skipped
every = comm.gather(parts.rows.copy())
if rank == 0:
    allp = np.concatenate(every)
    if args.dump:
        np.savez(args.dump, particles=allp, step=args.steps)
    byid = allp[np.argsort(allp["id"])]
    print(f"particles: {len(allp)}", flush=True)
    print("checksum:", hashlib.sha256(byid.tobytes() + field.tobytes()).hexdigest(), flush=True)
heap.close()
ROW.Free()
