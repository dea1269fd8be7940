"""The main job: 2D heat diffusion plus a pool of particles, checkpointed with hpcckpt.

The grid is block-distributed over a 2D Cartesian communicator (5-point stencil, halo
exchange with ``Sendrecv``); each rank also owns its share of the particles (by global id),
a few percent of which change at every step. All state lives in the rank's heap: the grid
``u`` (a distributed array with a halo of 1), the pool ``particles`` (a distributed table),
and the step counter saved as checkpoint meta. The arithmetic does not depend on the
decomposition, so the last line rank 0 prints, ``checksum: <sha256>`` of the final global
state, is the same for every rank count, and for a run that was killed and relaunched
(from its local heaps, or from an HDF5 export on another number of ranks) as for a
failure-free one.

Example::

    $ mpiexec -n 4 python -m hpcckpt.demo --no-checkpoint --quiet      # the baseline
    $ mpiexec -n 4 python -m hpcckpt.demo --no-checkpoint --save-with h5py   # plain dumps
    $ hpcckpt run -n 4 -- python -m hpcckpt.demo --kill-rank 2 --kill-at-step 55
    $ mpiexec -n 4 python -m hpcckpt.demo --export-dir /scratch/exports --export-every 5
    $ HPCCKPT_NODE_OF_RANK=0,0,1,1 mpiexec -n 4 python -m hpcckpt.demo --redundancy partner --root '/dev/shm/ck{node}'

SIGUSR1 (e.g. Slurm's ``--signal``) asks for a checkpoint (at the step boundary after next).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

PARTICLE = np.dtype([("pos", "f8", 2), ("vel", "f8", 2), ("temp", "f8"), ("id", "i8")])
ALPHA = 0.2  # diffusion number; stable below 0.25
RELAX = 0.1  # how fast a particle's temperature follows the grid
HOT_WALL = 100.0  # the top edge of the plate; the other edges are held at 0


class Block(NamedTuple):
    """This rank's part of the global grid: rows [x0, x0+nx), columns [y0, y0+ny)."""

    x0: int
    y0: int
    nx: int
    ny: int


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """Offset and length of part ``i`` of ``n`` items cut into near-equal parts: split(10, 3, 2) == (7, 3)."""
    q, r = divmod(n, parts)
    return i * q + min(i, r), q + (i < r)


def decompose(comm: MPI.Comm, nx: int, ny: int) -> tuple[MPI.Cartcomm, Block]:
    """A 2D Cartesian communicator (ranks kept as in ``comm``) and this rank's block."""
    dims = MPI.Compute_dims(comm.Get_size(), 2)
    if nx < dims[0] or ny < dims[1]:
        raise SystemExit(f"demo: a {nx}x{ny} grid is too small for {dims[0]}x{dims[1]} ranks; raise --nx/--ny")
    cart = comm.Create_cart(dims, periods=[False, False], reorder=False)
    (x0, bx), (y0, by) = (split(n, d, c) for n, d, c in zip((nx, ny), dims, cart.Get_coords(cart.Get_rank())))
    return cart, Block(x0, y0, bx, by)


# -- physics: plain functions on numpy arrays (heap arrays or ordinary ones) -----------

def init_grid(u: np.ndarray, block: Block, nx: int, ny: int) -> None:
    """Fill ``u`` (block plus halo) with two warm bumps; the global top halo is the hot wall."""
    x = (np.arange(block.x0, block.x0 + block.nx)[:, None] + 0.5) / nx
    y = (np.arange(block.y0, block.y0 + block.ny)[None, :] + 0.5) / ny

    def bump(cx: float, cy: float, r: float) -> np.ndarray:
        return np.maximum(0.0, 1.0 - ((x - cx) ** 2 + (y - cy) ** 2) / r**2) ** 2

    u[...] = 0.0
    u[1:-1, 1:-1] = 80.0 * bump(0.3, 0.3, 0.15) + 50.0 * bump(0.7, 0.6, 0.1)
    set_walls(u, block)


def set_walls(u: np.ndarray, block: Block) -> None:
    """The halo cells on the global edges: the hot wall on top (the others stay 0).

    Halo exchange never writes them, and a restore from an export leaves halos empty."""
    if block.x0 == 0:
        u[0, 1:-1] = HOT_WALL


def edge(u: np.ndarray, axis: int, i: int) -> np.ndarray:
    """Row (axis 0) or column (axis 1) ``i`` of ``u`` without the corners."""
    return u[i, 1:-1] if axis == 0 else u[1:-1, i]


def exchange_halos(cart: MPI.Cartcomm, u: np.ndarray) -> None:
    """Fill the halo of ``u`` from the four neighbours; the global edges keep theirs."""
    for axis in (0, 1):
        lower, upper = cart.Shift(axis, 1)
        for send, recv, dest, source in ((-2, 0, upper, lower), (1, -1, lower, upper)):
            out = np.ascontiguousarray(edge(u, axis, send))
            into = np.empty_like(out)
            cart.Sendrecv(out, dest, recvbuf=into, source=source)
            if source != MPI.PROC_NULL:
                edge(u, axis, recv)[...] = into


def diffuse(u: np.ndarray, scratch: np.ndarray) -> None:
    """One explicit step of the heat equation on the interior of ``u`` (halo filled)."""
    c = u[1:-1, 1:-1]
    np.add(u[:-2, 1:-1], u[2:, 1:-1], out=scratch)
    scratch += u[1:-1, :-2]
    scratch += u[1:-1, 2:]
    scratch -= 4.0 * c
    scratch *= ALPHA
    c += scratch


def init_particles(nx: int, ny: int, total: int, first: int, count: int, seed: int) -> np.ndarray:
    """Particles ``first..first+count`` of ``total``, spread over the plate, at 0 degrees.

    Every particle's start depends only on its global id, whatever the rank count."""
    rng = np.random.default_rng(seed)
    pos, vel = rng.random((total, 2)) * [nx, ny], rng.uniform(-0.5, 0.5, (total, 2))
    p = np.zeros(count, PARTICLE)
    p["id"] = np.arange(first, first + count)
    p["pos"], p["vel"] = pos[first:first + count], vel[first:first + count]
    return p


def chosen(step: int, total: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted global ids of the particles that change at ``step`` (the same on every rank)."""
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.choice(total, size=round(total * fraction), replace=False))


def move(p: np.ndarray, nx: int, ny: int) -> None:
    """Advance particles ``p`` in place: drift, bounce off the plate's edges, relax toward the
    wall's temperature profile (elementwise: the same result whichever rank owns a particle)."""
    hi = np.array([nx, ny], dtype=float)
    pos = p["pos"] + p["vel"]
    low, high = pos < 0.0, pos > hi
    p["pos"] = np.where(low, -pos, np.where(high, 2 * hi - pos, pos))
    p["vel"] = np.where(low | high, -p["vel"], p["vel"])
    p["temp"] += RELAX * (HOT_WALL * (1.0 - p["pos"][:, 0] / nx) - p["temp"])


# -- storage: the heap's pool, or a plain array with the same p[i] access --------------

class Records:
    """A plain structured array with a heap pool's bulk access: ``take(idx)``, ``put(idx, recs)``."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def take(self, indices) -> np.ndarray:
        return self.array[np.asarray(indices, dtype=np.int64)]

    def put(self, indices, records: np.ndarray) -> None:
        self.array[np.asarray(indices, dtype=np.int64)] = records

    def __len__(self) -> int:
        return len(self.array)


def checksums(comm: MPI.Comm, block: Block, u: np.ndarray, pool, nx: int, ny: int) -> tuple[str, str] | None:
    """On rank 0: SHA-256 of the global grid, and of grid plus all particles sorted by id."""
    mine = (tuple(block), np.ascontiguousarray(u[1:-1, 1:-1]), pool.take(np.arange(len(pool))))
    parts = comm.gather(mine, root=0)
    if parts is None:
        return None
    grid = np.empty((nx, ny))
    for (x0, y0, bx, by), a, _ in parts:
        grid[x0:x0 + bx, y0:y0 + by] = a
    particles = np.concatenate([p for *_, p in parts])
    particles = particles[np.argsort(particles["id"], kind="stable")]
    h = hashlib.sha256(grid.tobytes())
    grid_hex = h.hexdigest()
    h.update(particles.tobytes())
    return grid_hex, h.hexdigest()


def save_state(how: str, directory: str, rank: int, u: np.ndarray, particles: np.ndarray, step: int) -> None:
    """Save this rank's full state without hpcckpt, overwriting the previous save.

    ``h5py``: ``<directory>/rank<r>.h5`` (datasets "u", "particles", attribute "step"),
    flushed and closed; ``npy``: ``rank<r>_u.npy`` and ``rank<r>_particles.npy``, each fsynced.

    >>> d = tempfile.mkdtemp()
    >>> save_state("npy", d, 0, np.zeros((3, 3)), np.zeros(2, PARTICLE), 10)
    >>> sorted(os.listdir(d)), shutil.rmtree(d)
    (['rank0_particles.npy', 'rank0_u.npy'], None)
    """
    if how == "h5py":
        import h5py

        with h5py.File(os.path.join(directory, f"rank{rank}.h5"), "w") as f:
            f.create_dataset("u", data=u)
            f.create_dataset("particles", data=particles)
            f.attrs["step"] = step
            f.flush()
        return
    for suffix, a in (("u", u), ("particles", particles)):
        with open(os.path.join(directory, f"rank{rank}_{suffix}.npy"), "wb") as f:
            np.save(f, a)
            f.flush()
            os.fsync(f.fileno())


def report(step: int, epoch: int, stats: dict) -> str:
    """One progress line from ``heap.stats``: bytes summed over ranks, times the slowest rank's."""
    tot, slow = stats.get("total", stats), stats.get("max", stats)
    mb = lambda k: f"{tot.get(k, 0) / 1e6:.2f} MB"  # noqa: E731
    ms = " ".join(f"{k[2:]} {slow.get(k, 0) * 1e3:.1f}" for k in ("t_scan", "t_copy", "t_flush", "t_commit"))
    part = stats.get("partner")
    sent = f"; to partner {part['bytes_sent'] / 1e6:.2f} MB in {part['t_partner'] * 1e3:.1f} ms" if part else ""
    return (f"step {step} epoch {epoch}: {int(tot.get('objects_dirty', 0))} objects / {mb('bytes_dirty')} dirty, "
            f"copied {mb('bytes_copied')} (pages: {mb('bytes_page_baseline')}); ms {ms}{sent} [{stats.get('tracker')}]")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hpcckpt.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nx", type=int, default=512)
    ap.add_argument("--ny", type=int, default=512)
    ap.add_argument("--particles", type=int, default=100_000, help="in total, split over the ranks")
    ap.add_argument("--change", type=float, default=0.02, help="fraction of particles changed per step")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=10, metavar="K", help="0: only at the end")
    ap.add_argument("--tracker", default="auto")
    ap.add_argument("--name", default="demo", help="heap name; a run with an existing name resumes it")
    ap.add_argument("--root", help="heap directory (default $HPCCKPT_ROOT or hpcckpt's default)")
    ap.add_argument("--capacity", default="1GiB")
    ap.add_argument("--export-dir", metavar="DIR", help="export committed epochs to HDF5 here; restart from "
                    "them when the local heaps are lost or the rank count changed")
    ap.add_argument("--export-every", type=int, default=0, metavar="K", help="export every K-th checkpoint")
    ap.add_argument("--redundancy", choices=("none", "partner"), default="none",
                    help="partner: keep a copy of each rank's checkpoints on a rank of another node")
    ap.add_argument("--kill-rank", type=int, metavar="R")
    ap.add_argument("--kill-at-step", type=int, metavar="S", help="rank R SIGKILLs itself after step S (attempt 1 only)")
    ap.add_argument("--no-checkpoint", action="store_true", help="plain numpy arrays, no hpcckpt: the baseline")
    ap.add_argument("--save-with", choices=("h5py", "npy"),
                    help="with --no-checkpoint: save the full state this way every K steps instead")
    ap.add_argument("--quiet", action="store_true", help="print only the checksum")
    args = ap.parse_args(argv)
    if (args.kill_rank is None) != (args.kill_at_step is None):
        ap.error("give --kill-rank and --kill-at-step together")
    if args.save_with and not args.no_checkpoint:
        ap.error("--save-with needs --no-checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo on ``MPI.COMM_WORLD``; returns 0."""
    args = parse(argv)
    wanted: list[bool] = []  # SIGUSR1 asks for a checkpoint; caught from the start, so an early one never kills us
    signal.signal(signal.SIGUSR1, lambda *_: wanted.append(True))
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 and not args.quiet else (lambda *a: None)
    cart, block = decompose(comm, args.nx, args.ny)
    first, count = split(args.particles, size, rank)
    shape = (block.nx + 2, block.ny + 2)

    heap, start = None, 0
    if args.no_checkpoint:
        u, pool = np.zeros(shape), Records(np.zeros(count, PARTICLE))
    else:
        import hpcckpt

        try:
            heap = hpcckpt.open(args.name, comm=comm, root=args.root, capacity=args.capacity, tracker=args.tracker,
                                export_dir=args.export_dir, export_every=args.export_every,
                                redundancy=args.redundancy)
        except (OSError, hpcckpt.HeapError) as e:   # every rank gets the same error: one line, from rank 0
            raise SystemExit(f"demo: {e}" if rank == 0 else 1)
        try:   # declared every time: a restored object with this layout comes back, another is re-blocked
            u = heap.array("u", shape, np.float64, global_shape=(args.nx, args.ny), offset=(block.x0, block.y0),
                           halo=(1, 1))
            pool = heap.pool("particles", PARTICLE, count, global_count=args.particles, offset=first,
                             writes="put")   # moved with take/put only: no tracker needs to watch it
        except (KeyError, hpcckpt.HeapError) as e:
            raise SystemExit(f"demo: heap {args.name!r} holds a run of another size ({e}); choose another --name")
        start = heap.meta.get("step", 0) if heap.epoch is not None else 0
        set_walls(u, block)
    if start == 0:
        init_grid(u, block, args.nx, args.ny)
        pool.put(np.arange(count), init_particles(args.nx, args.ny, args.particles, first, count, args.seed))
    save_dir, own_dir = None, None
    if args.save_with:
        root = args.root or os.environ.get("HPCCKPT_ROOT")
        if root is None:  # a fresh tempdir, removed at the end
            root = own_dir = comm.bcast(tempfile.mkdtemp(prefix="hpcckpt-demo-") if rank == 0 else None)
        save_dir = os.path.join(root, args.name)
        if args.save_with == "h5py":
            import h5py  # noqa: F401  (imported here, not inside the timed saves)
        os.makedirs(save_dir, exist_ok=True)
    dims = cart.Get_topo()[0]
    say(f"demo: {size} ranks ({dims[0]}x{dims[1]}), grid {args.nx}x{args.ny}, {args.particles} particles, "
        + (f"no checkpoints, saves with {args.save_with} to {save_dir}" if save_dir else
           "no checkpoints" if heap is None else f"heap {args.name!r} " + (
            f"resumed from epoch {heap.epoch} at step {start} ({heap.restored_from} level)" if start
            else "started fresh")))

    mine_flag, any_flag, vote = np.zeros(1, np.int32), np.zeros(1, np.int32), None
    first_attempt = os.environ.get("HPCCKPT_ATTEMPT", "") in ("", "1")
    scratch = np.empty((block.nx, block.ny))
    t_start, t_ckpt, n_ckpt = MPI.Wtime(), 0.0, 0
    phases = dict.fromkeys(("t_scan", "t_copy", "t_flush", "t_commit"), 0.0)  # summed slowest-rank times
    sent: dict[str, float] = {}   # rank 0's bytes copied and sent to its partner, summed
    for step in range(start + 1, args.steps + 1):
        exchange_halos(cart, u)
        diffuse(u, scratch)
        ids = chosen(step, args.particles, args.change, args.seed)
        mine = ids[np.searchsorted(ids, first):np.searchsorted(ids, first + count)] - first
        p = pool.take(mine)
        move(p, args.nx, args.ny)
        pool.put(mine, p)
        if step == args.kill_at_step and rank == args.kill_rank and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        due = step == args.steps or (args.checkpoint_every and step % args.checkpoint_every == 0)
        if save_dir and due:
            t = MPI.Wtime()
            save_state(args.save_with, save_dir, rank, u, pool.array, step)
            saved = np.ones(1, np.int32)   # a global save is complete when every rank knows every rank saved:
            comm.Allreduce(MPI.IN_PLACE, saved, op=MPI.MIN)   # the one collective any coordinated checkpoint needs
            t_ckpt, n_ckpt = t_ckpt + MPI.Wtime() - t, n_ckpt + 1
        if heap is None:
            continue
        # the ranks agree on SIGUSR1 with a nonblocking vote posted one step earlier, so that
        # asking costs no synchronisation of its own (a blocking allreduce per step: +0.2 s per 0.9 s run)
        if vote is not None:
            vote.Wait()
        asked = bool(any_flag[0])
        n = len(wanted)  # a signal arriving right now counts for the next vote
        mine_flag[0], wanted[:n] = n > 0, []
        vote = comm.Iallreduce(mine_flag, any_flag, op=MPI.MAX)
        if asked or due:
            t = MPI.Wtime()
            epoch = heap.checkpoint(step=step)
            t_ckpt, n_ckpt = t_ckpt + MPI.Wtime() - t, n_ckpt + 1
            slow = heap.stats.get("max", {})
            for k in phases:
                phases[k] += slow.get(k, 0.0)
            for k, v in heap.stats.get("partner", {}).items():   # this rank's partner phase
                if k != "full":
                    sent[k] = sent.get(k, 0) + v
            sent["bytes_copied"] = sent.get("bytes_copied", 0) + heap.stats["bytes_copied"]
            say(report(step, epoch, heap.stats) + (" (asked by SIGUSR1)" if asked else ""))
    if vote is not None:
        vote.Wait()
    elapsed = MPI.Wtime() - t_start
    what = "saves" if save_dir else "checkpoints"
    say(f"time: {elapsed:.3f} s for {args.steps - start} steps, {t_ckpt:.3f} s in {n_ckpt} {what}")
    mode = args.save_with or ("none" if heap is None else "hpcckpt")
    exported = heap.stats.get("export", {}) if heap is not None else {}
    say("timing: " + json.dumps({"elapsed": elapsed, "t_save": t_ckpt, "n_save": n_ckpt, "steps": args.steps - start,
                                 "mode": mode, **(phases if heap is not None else {}),
                                 "n_export": exported.get("started", 0), "t_export_stall": exported.get("t_stall", 0.0),
                                 **({f"partner_{k}": v for k, v in sent.items()} if "t_partner" in sent else {}),
                                 "state_bytes": int(u.nbytes + count * PARTICLE.itemsize),
                                 **{f"export_{k}": v for k, v in exported.items() if k.startswith("t_") and k != "t_stall"}}))

    sums = checksums(comm, block, u, pool, args.nx, args.ny)
    if heap is not None:
        heap.close()
    if own_dir:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(own_dir, ignore_errors=True)
    if sums:
        say(f"grid checksum: {sums[0]}")
        print(f"checksum: {sums[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
