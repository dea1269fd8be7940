"""``hpcckpt export | restore`` and the export side of ``info | verify``, without MPI.

>>> export(["demo", "--to", "/scratch/exports"])        # doctest: +SKIP
/scratch/exports/demo/e12.h5: epoch 12 of 4 ranks, 2 objects
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal

from .errors import HeapBusyError, HeapError
from .export import build_manifest, finish, rank_request, run_rank_request, umask_for
from .h5io import BlockReader
from ._progress import Progress
from .heap import Heap, _dtype_parse, check_job
from .manifest import ExportError, Manifest, complete_exports, load_manifest, read_latest

_MASTER = re.compile(r"^e(\d+)\.(h5|json)$")


def find_export(target: str) -> tuple[str, int | None] | None:
    """(job directory, epoch or None for LATEST) if `target` names an export, else None.

    Accepts a job's export directory (with LATEST), a master ``e<E>.h5`` or a manifest ``e<E>.json``.
    """
    if os.path.isfile(target):
        m = _MASTER.match(os.path.basename(target))
        return (os.path.dirname(os.path.abspath(target)), int(m.group(1))) if m else None
    if os.path.isdir(target) and (os.path.exists(os.path.join(target, "LATEST")) or
                                  any(_MASTER.match(f) for f in os.listdir(target))):
        return os.path.abspath(target), None
    return None


def manifest_of(job_dir: str, epoch: int | None) -> Manifest:
    """The manifest of `epoch`, or of the export LATEST names; an ExportError says what is missing."""
    if epoch is None:
        found = complete_exports(job_dir)
        if not found:
            raise ExportError(f"{job_dir}: no complete export (no LATEST marker, or it names nothing)")
        epoch = found[0]
    return load_manifest(job_dir, epoch)


def export_summary(job_dir: str, m: Manifest) -> dict:
    latest = read_latest(job_dir)
    return {"path": os.path.join(job_dir, f"e{m.epoch}.h5"), "job": m.job, "epoch": m.epoch,
            "world_size": m.world_size, "meta": m.meta, "latest": latest == m.epoch,
            "objects": {n: {"kind": o["kind"], "dtype": str(_dtype_parse(o["dtype"])),
                            "shape": o["global_shape"] if o["global_shape"] else [b["shape"] for b in o["blocks"]],
                            "layout": "distributed" if o["distributed"] else
                            "replicated" if o["replicated"] else "rank-private",
                            "bytes": sum(_nbytes(o, b) for b in o["blocks"])} for n, o in m.objects.items()}}


def _nbytes(obj: dict, b: dict) -> int:
    n = _dtype_parse(obj["dtype"]).itemsize
    for s in b["shape"]:
        n *= s
    return n


def missing_files(job_dir: str, m: Manifest) -> list[str]:
    """The files an export needs (master and every block's rank file) that are not there."""
    need = [f"e{m.epoch}.h5"] + sorted({b["file"] for o in m.objects.values() for b in o["blocks"]})
    return [f for f in need if not os.path.isfile(os.path.join(job_dir, f))]


def info_export(job_dir: str, epoch: int | None, check: bool = False, quiet: bool = True) -> list[dict]:
    """What `hpcckpt info` shows of an export directory (every complete export) or one export.

    Each summary says ``problem`` (a missing file, or with `check` a block whose CRC does not
    match; else None) and ``verified`` (True only when `check` read every block).
    """
    epochs = [epoch] if epoch is not None else complete_exports(job_dir)
    if not epochs:
        raise ExportError(f"{job_dir}: no complete export (no LATEST marker, or it names nothing)")
    out = []
    for e in epochs:
        m = load_manifest(job_dir, e)
        s = {**export_summary(job_dir, m), "problem": None, "verified": False}
        gone = missing_files(job_dir, m)
        if gone:
            s["problem"] = f"incomplete: missing {', '.join(gone[:3])}{'...' if len(gone) > 3 else ''}"
        elif check:
            try:
                verify_export(job_dir, e, quiet=quiet)
                s["verified"] = True
            except (HeapError, OSError) as err:
                s["problem"] = f"damaged: {err}"
        out.append(s)
    return out


def verify_export(job_dir: str, epoch: int | None, quiet: bool = False) -> dict:
    """Read every block of an export and recompute every CRC; raises ExportError naming the file."""
    m = manifest_of(job_dir, epoch)
    reader = BlockReader(job_dir)
    blocks = [(o, x) for o in m.objects.values() for b in o["blocks"] for x in [b, *b.get("edges", [])]]
    bar = Progress(len(blocks), f"verify e{m.epoch}", quiet)
    nbytes = 0
    try:
        for o, b in blocks:
            data = reader.read(b, _dtype_parse(o["dtype"]), tuple(slice(0, n) for n in b["shape"]))
            if reader.block_crc(b, data.nbytes) != b["crc32c"]:   # every chunk checked: now the whole
                raise ExportError(f"{os.path.join(job_dir, b['file'])}: {b['dataset']!r} does not match its "
                                  "checksum in the manifest")
            nbytes += data.nbytes
            bar.step()
    finally:
        bar.close()
        reader.close()
    return {"path": os.path.join(job_dir, f"e{m.epoch}.h5"), "epoch": m.epoch, "blocks": len(blocks),
            "bytes": nbytes}


def export(argv: list[str]) -> int:
    """Export the last committed epoch of a job's heaps (the job not running) to HDF5."""
    from ._cli_heap import heap_files

    ap = argparse.ArgumentParser(prog="hpcckpt export", description="export a job's heaps to HDF5 (offline)")
    ap.add_argument("target", help="job name, directory of rank*.heap, or heap file")
    ap.add_argument("--to", required=True, metavar="DIR", help="export directory (the job's files go in DIR/<job>)")
    ap.add_argument("--name", metavar="JOB", help="job name of the export (default: the heaps' own)")
    ap.add_argument("--mode", default="600", metavar="OCTAL",
                    help="mode of the files written (default 600: private; directories get the search bits too)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        mode = int(args.mode, 8)
        if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
            raise ValueError
    except ValueError:
        ap.error(f"--mode {args.mode}: give an octal file mode with read and write for you, e.g. 600 or 640")
    paths = heap_files(args.target)
    heaps = []
    umask = os.umask(umask_for(mode))   # files private unless --mode says otherwise
    try:
        for p in paths:
            try:
                heaps.append(Heap.open(p, readonly=True))
            except HeapBusyError:
                raise HeapBusyError(f"{p}: the job is running; hpcckpt export needs it stopped (a running job "
                                    "exports itself: hpcckpt.open(..., export_dir=DIR), heap.export())") from None
        infos = [h.info for h in heaps]
        job, size = infos[0]["job"], infos[0]["world_size"]
        ranks = sorted(i["rank"] for i in infos)
        if ranks != list(range(size)) or any(i["job"] != job or i["world_size"] != size for i in infos):
            raise HeapError(f"{args.target}: these heaps are not one whole job (ranks {ranks} of {size})")
        epochs = {i["prepared"] for i in infos}
        if epochs == {0}:
            raise HeapError(f"{args.target}: nothing was ever committed; there is nothing to export")
        if len(epochs) > 1:
            raise HeapError(f"{args.target}: the ranks' heaps are at epochs {sorted(epochs)} (a checkpoint was cut "
                            "short); reopen the job once so that it restores its common epoch, then export")
        epoch = epochs.pop()
        job = job_name(args.name if args.name is not None else job,
                       "--name" if args.name is not None else f"{paths[0]}: the heap's job {job!r}")
        job_dir = os.path.join(os.path.abspath(args.to), job)   # a plain name: nothing lands outside --to
        os.makedirs(job_dir, exist_ok=True)
        meta = {k: v for k, v in heaps[0].meta.items() if not k.startswith("__hpcckpt")}
        per_rank = [None] * size
        bar = Progress(size, f"export e{epoch}", args.json)
        for h, i in zip(heaps, infos):
            req = rank_request(h, job_dir, job, epoch, i["rank"], size, meta)
            per_rank[i["rank"]] = run_rank_request(req, h._native.read_epoch)
            bar.step()
        bar.close()
        master = finish(job_dir, build_manifest(job, epoch, size, meta, per_rank))
    finally:
        os.umask(umask)
        for h in heaps:
            h.close()
    out = {"path": master, "epoch": epoch, "world_size": size}
    print(json.dumps(out) if args.json else f"{master}: epoch {epoch} of {size} ranks exported")
    return 0


MAX_RANKS = 65536   # restore -n: a bound on the heaps one command creates
_STOPS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def job_name(name: str, where: str) -> str:
    """`name` if it is a plain job name (it becomes a directory); else an error naming `where`."""
    try:
        check_job(name)
    except ValueError as e:
        raise ExportError(f"{where}: {e}; refused (nothing written); give --name NAME to choose the job name") \
            from None
    if not name:
        raise ExportError(f"{where}: no job name (the heaps were created without job=); give --name NAME")
    return name


def _made_dirs(directory: str) -> list[str]:
    """Create `directory` (0700) and its missing parents; returns those it created, deepest first."""
    made, d = [], os.path.abspath(directory)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    for d in reversed(made):
        os.mkdir(d, 0o700)
    return made


class _Stop:
    """SIGTERM, SIGHUP and SIGINT end a restore with SystemExit (so that it cleans up after itself),
    except inside ``with stop.held():``, where a signal waits until the block is done (a heap is
    then created and recorded, or neither)."""

    def __init__(self) -> None:
        self.holding, self.pending = False, 0
        self.old = {s: signal.signal(s, self) for s in _STOPS}

    def __call__(self, sig: int, _frame) -> None:
        if self.holding:
            self.pending = sig
        else:
            raise SystemExit(f"hpcckpt restore: stopped by signal {sig}; the heaps it created were removed")

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            self(self.pending, None)

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def restore(argv: list[str]) -> int:
    """Lay out heaps for M ranks from an export, ahead of a job on M ranks.

    The heaps go in ROOT/<job>/, the job named by the export (a plain name, else refused) or
    by --name. On failure or SIGINT/SIGTERM/SIGHUP only the heaps this command created are
    removed, and the directories it created.

    >>> restore(["/scratch/exports/demo", "--to", "/dev/shm/me", "-n", "2"])   # doctest: +SKIP
    /dev/shm/me/demo: 2 heaps at epoch 12 {"step": 120}
    """
    from .restore import fill_from_export

    ap = argparse.ArgumentParser(prog="hpcckpt restore", description="lay out heaps for M ranks from an export")
    ap.add_argument("export", help="export directory of a job, or a master e<E>.h5")
    ap.add_argument("--to", required=True, metavar="ROOT", help="heap root (the heaps go in ROOT/<job>/)")
    ap.add_argument("-n", type=int, required=True, metavar="M", help=f"number of ranks of the new job (1..{MAX_RANKS})")
    ap.add_argument("--name", metavar="JOB", help="job name of the heaps (default: the export's)")
    ap.add_argument("--capacity", default="1GiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= MAX_RANKS:
        ap.error(f"-n must be from 1 to {MAX_RANKS}, got {args.n}")
    where = find_export(args.export)
    if where is None:
        raise SystemExit(f"hpcckpt restore: {args.export}: not an export directory or master file")
    m = manifest_of(*where)
    job = job_name(args.name if args.name is not None else m.job,
                   "--name" if args.name is not None else f"{where[0]}: the manifest's job {m.job!r}")
    directory = os.path.join(args.to, job)
    if os.path.isdir(directory):
        existing = [f for f in os.listdir(directory) if f.endswith(".heap")]
        if existing:
            raise SystemExit(f"hpcckpt restore: {directory} already holds heaps ({', '.join(sorted(existing)[:3])}"
                             f"{'...' if len(existing) > 3 else ''}); remove them first (hpcckpt rm {directory})")
    made, created, stop = [], [], _Stop()
    bar = Progress(args.n, f"restore e{m.epoch} to {args.n} ranks", args.json)
    try:
        with stop.held():
            made = _made_dirs(directory)
        for r in range(args.n):
            path = os.path.join(directory, f"rank{r}.heap")
            with stop.held():   # created and recorded, or neither
                heap = Heap.create(path, args.capacity, job=job, rank=r, world_size=args.n)
                created.append(path)
            try:
                fill_from_export(heap, where[0], m, r, args.n).close()
                heap._native.rebase(m.epoch - 1)
                heap.checkpoint(**m.meta)
                heap.close()
            except BaseException:
                heap._native.abandon()
                raise
            bar.step()
    except BaseException:
        stop.holding = True   # a second signal does not cut the cleanup short
        for path in created:
            os.unlink(path)
        for d in made:
            if not os.listdir(d):
                os.rmdir(d)
        raise
    finally:
        bar.close()
        stop.restore()
    out = {"root": directory, "epoch": m.epoch, "ranks": args.n}
    print(json.dumps(out) if args.json else f"{directory}: {args.n} heaps at epoch {m.epoch} {json.dumps(m.meta)}")
    return 0


__all__ = ["export", "restore", "find_export", "info_export", "verify_export"]
