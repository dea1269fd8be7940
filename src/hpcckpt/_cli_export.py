"""``hpcckpt export | restore`` and the export side of ``info | verify``, without MPI.

>>> export(["demo", "--to", "/scratch/exports"])        # doctest: +SKIP
/scratch/exports/demo/e12.h5: epoch 12 of 4 ranks, 2 objects
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from .errors import HeapError
from .export import build_manifest, finish, rank_request, run_rank_request
from .h5io import BlockReader
from ._progress import Progress
from .heap import Heap, _dtype_parse
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


def info_export(job_dir: str, epoch: int | None) -> list[dict]:
    """What `hpcckpt info` shows of an export directory (every complete export) or one export."""
    epochs = [epoch] if epoch is not None else complete_exports(job_dir)
    if not epochs:
        raise ExportError(f"{job_dir}: no complete export (no LATEST marker, or it names nothing)")
    return [export_summary(job_dir, load_manifest(job_dir, e)) for e in epochs]


def verify_export(job_dir: str, epoch: int | None, quiet: bool = False) -> dict:
    """Read every block of an export and recompute every CRC; raises ExportError naming the file."""
    m = manifest_of(job_dir, epoch)
    reader = BlockReader(job_dir)
    blocks = [(o, b) for o in m.objects.values() for b in o["blocks"]]
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
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    paths = heap_files(args.target)
    heaps = []
    try:
        for p in paths:
            heaps.append(Heap.open(p, readonly=True))
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
        job_dir = os.path.join(os.path.abspath(args.to), job)
        os.makedirs(job_dir, exist_ok=True)
        meta = heaps[0].meta
        per_rank = [None] * size
        bar = Progress(size, f"export e{epoch}", args.json)
        for h, i in zip(heaps, infos):
            req = rank_request(h, job_dir, job, epoch, i["rank"], size, meta)
            per_rank[i["rank"]] = run_rank_request(req, h._native.read_epoch)
            bar.step()
        bar.close()
        master = finish(job_dir, build_manifest(job, epoch, size, meta, per_rank))
    finally:
        for h in heaps:
            h.close()
    out = {"path": master, "epoch": epoch, "world_size": size}
    print(json.dumps(out) if args.json else f"{master}: epoch {epoch} of {size} ranks exported")
    return 0


def restore(argv: list[str]) -> int:
    """Lay out heaps for M ranks from an export, ahead of a job on M ranks."""
    from .restore import fill_from_export

    ap = argparse.ArgumentParser(prog="hpcckpt restore", description="lay out heaps for M ranks from an export")
    ap.add_argument("export", help="export directory of a job, or a master e<E>.h5")
    ap.add_argument("--to", required=True, metavar="ROOT", help="heap root (the heaps go in ROOT/<job>/)")
    ap.add_argument("-n", type=int, required=True, metavar="M", help="number of ranks of the new job")
    ap.add_argument("--capacity", default="1GiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"-n must be at least 1, got {args.n}")
    where = find_export(args.export)
    if where is None:
        raise SystemExit(f"hpcckpt restore: {args.export}: not an export directory or master file")
    m = manifest_of(*where)
    directory = os.path.join(args.to, m.job)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    existing = [f for f in os.listdir(directory) if f.endswith(".heap")]
    if existing:
        raise SystemExit(f"hpcckpt restore: {directory} already holds heaps ({', '.join(sorted(existing)[:3])}...); "
                         "remove them first")
    bar = Progress(args.n, f"restore e{m.epoch}", args.json)
    for r in range(args.n):
        path = os.path.join(directory, f"rank{r}.heap")
        heap = Heap.create(path, args.capacity, job=m.job, rank=r, world_size=args.n)
        try:
            fill_from_export(heap, where[0], m, r, args.n).close()
            heap._native.rebase(m.epoch - 1)
            heap.checkpoint(**m.meta)
            heap.close()
        except BaseException:
            heap._native.abandon()
            for f in os.listdir(directory):
                os.unlink(os.path.join(directory, f))
            raise
        bar.step()
    bar.close()
    out = {"root": directory, "epoch": m.epoch, "ranks": args.n}
    print(json.dumps(out) if args.json else f"{directory}: {args.n} heaps at epoch {m.epoch} {json.dumps(m.meta)}")
    return 0


__all__ = ["export", "restore", "find_export", "info_export", "verify_export"]
