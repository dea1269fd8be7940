"""The export manifest: what an export holds, where, with which checksums (JSON, never pickle).

An export of epoch E of job J lives under ``<dir>/<J>/``: ``e<E>/rank<r>.h5`` (one per rank),
the master ``e<E>.h5`` (a virtual dataset per distributed object), the manifest ``e<E>.json``
and the marker ``LATEST`` naming the newest complete export.  Restore trusts the manifest
and reads the rank files directly.

>>> m = Manifest(job="demo", epoch=3, world_size=2, meta={"step": 30}, objects={})
>>> Manifest.from_json(m.to_json(), "e3.json").epoch
3
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

from .errors import HeapError

FORMAT = "hpcckpt-export"
VERSION = 1
_EXPORT = re.compile(r"^e(\d+)\.json$")


class ExportError(HeapError):
    """An export is missing, incomplete, damaged or does not fit; the message names the file."""


@dataclass
class Manifest:
    """One complete export: per object its dtype, kind, global shape and every block.

    A block is a dict: rank, offset, shape (of the exported data), halo, file (relative to
    the job directory), dataset, crc32c of the block, chunk_rows and crc32c of the chunk CRCs.
    """

    job: str
    epoch: int
    world_size: int
    meta: dict
    objects: dict = field(default_factory=dict)

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps({**body, "crc32c": _crc(body)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str) -> Manifest:
        """Parse and check a manifest; anything malformed is an ExportError naming `path`."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ExportError(f"{path}: manifest is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ExportError(f"{path}: not an hpcckpt export manifest")
        if d.get("version") != VERSION:
            raise ExportError(f"{path}: export format version {d.get('version')}, this hpcckpt reads {VERSION}; "
                              "restore it with the hpcckpt that wrote it")
        crc = d.pop("crc32c", None)
        if crc != _crc(d):
            raise ExportError(f"{path}: manifest is damaged (checksum mismatch)")
        try:
            m = cls(job=str(d["job"]), epoch=_count(d["epoch"], "epoch", 1), world_size=_count(d["world_size"],
                    "world_size", 1, 1 << 24), meta=dict(d["meta"]), objects=dict(d["objects"]))
            for name, obj in m.objects.items():
                for key in ("kind", "dtype", "global_shape", "distributed", "replicated", "blocks"):
                    obj[key]
                if obj["global_shape"] is not None:
                    _dims(obj["global_shape"], f"{name}: global_shape")
                for b in obj["blocks"]:
                    for key in ("rank", "offset", "shape", "file", "dataset", "crc32c", "chunk_rows", "chunks_crc32c"):
                        b[key]
                    _check_block(name, b, m.world_size)
        except KeyError as e:
            raise ExportError(f"{path}: manifest is incomplete (no {e}); it is not used") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ExportError(f"{path}: manifest is malformed ({e}); it is not used") from None
        return m


def _count(v, what: str, low: int = 0, high: int = 1 << 62) -> int:
    """`v` if it is an integer (not a bool, not a float) in [low, high), else ValueError."""
    if type(v) is not int or not low <= v < high:
        bound = lambda x: f"2^{x.bit_length() - 1}" if abs(x) >= 1 << 32 else str(x)   # noqa: E731
        low_s = f"-{bound(-low)}" if low < 0 else bound(low)
        raise ValueError(f"{what} {repr(v)[:40]} is not an integer from {low_s} to below {bound(high)}")
    return v


def _dims(v, what: str, low: int = 0) -> list[int]:
    """A shape or offset: a list of integers of at most 32 dimensions, no larger than 2^62 in all."""
    if not isinstance(v, list) or len(v) > 32:
        raise ValueError(f"{what} {v!r} is not a list of integers")
    out = [_count(x, what, low) for x in v]
    if low >= 0 and math.prod(out) >= 1 << 62:
        raise ValueError(f"{what} {v!r} is too large")
    return out


def _check_block(name: str, b: dict, world_size: int) -> None:
    """The values of a block that decide what a restore reads: integers in range, a file path
    inside the export's directory; anything else makes the whole export unusable."""
    _count(b["rank"], f"{name}: rank", 0, world_size)
    shape = _dims(b["shape"], f"{name}: shape")
    _dims(b["offset"], f"{name}: offset", -(1 << 62))
    if "halo" in b:
        _dims(b["halo"], f"{name}: halo")
    _count(b["crc32c"], f"{name}: crc32c", 0, 1 << 32)
    _count(b["chunks_crc32c"], f"{name}: chunks_crc32c", 0, 1 << 32)
    rows = _count(b["chunk_rows"], f"{name}: chunk_rows", 1)
    if "nchunks" in b and shape:
        _count(b["nchunks"], f"{name}: nchunks", -(-shape[0] // rows), -(-shape[0] // rows) + 1)
    for e in b.get("edges", []):   # the ghost cells on the global edge: read like a block
        _check_block(f"{name} (edge)", {**e, "rank": b["rank"]}, world_size)
    f, ds = b["file"], b["dataset"]
    if not isinstance(f, str) or not isinstance(ds, str) or "\0" in f + ds or os.path.isabs(f) or \
            os.path.normpath(f).startswith("..") or ".." in f.split("/"):
        raise ValueError(f"{name}: file {f!r} / dataset {ds!r} is not a path inside the export")


def _crc(body: dict) -> int:
    from . import _native

    return _native.crc32c(json.dumps(body, sort_keys=True).encode())


def export_paths(job_dir: str, epoch: int) -> dict[str, str]:
    """Where the pieces of the export of `epoch` live."""
    return {"dir": os.path.join(job_dir, f"e{epoch}"), "master": os.path.join(job_dir, f"e{epoch}.h5"),
            "manifest": os.path.join(job_dir, f"e{epoch}.json"), "latest": os.path.join(job_dir, "LATEST")}


def fsync_path(path: str) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Write `path` atomically: a temporary file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)   # a failed write (a full file system) leaves no temporary file behind
        except OSError:
            pass
        raise
    fsync_path(os.path.dirname(path) or ".")


def read_latest(job_dir: str) -> int | None:
    """The epoch LATEST names, or None when there is no (valid) marker."""
    path = os.path.join(job_dir, "LATEST")
    try:
        with open(path) as f:
            d = json.load(f)
        epoch = d["epoch"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        return None
    if type(epoch) is not int or not 0 < epoch < 1 << 62:   # 1e999, -3, 0, "7", true: no marker
        return None
    return epoch


def write_latest(job_dir: str, epoch: int) -> bool:
    """Point LATEST at `epoch`, only forward: an export of an older epoch (an offline export of
    older heaps) is written beside the newer ones and LATEST stays.  Returns whether it moved."""
    current = read_latest(job_dir)
    if current is not None and current > epoch:
        return False
    write_durably(os.path.join(job_dir, "LATEST"),
                  json.dumps({"format": FORMAT, "epoch": epoch, "manifest": f"e{epoch}.json"}).encode())
    return True


def complete_exports(job_dir: str) -> list[int]:
    """Epochs of the complete exports, newest first: a manifest, and not newer than LATEST."""
    latest = read_latest(job_dir)
    if latest is None or not os.path.isdir(job_dir):
        return []
    found = [int(m.group(1)) for m in map(_EXPORT.match, os.listdir(job_dir)) if m]
    return sorted((e for e in found if e <= latest), reverse=True)


def load_manifest(job_dir: str, epoch: int) -> Manifest:
    path = export_paths(job_dir, epoch)["manifest"]
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ExportError(f"{path}: cannot read the manifest: {e.strerror}") from None
    m = Manifest.from_json(text, path)
    if m.epoch != epoch:
        raise ExportError(f"{path}: manifest says epoch {m.epoch}, its name says {epoch}")
    return m


def remove_export(job_dir: str, epoch: int) -> None:
    """Remove every piece of one export (missing pieces are fine)."""
    p = export_paths(job_dir, epoch)
    for f in (p["manifest"], p["master"]):
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
    shutil.rmtree(p["dir"], ignore_errors=True)


def tidy(job_dir: str, keep: int = 2, running: bool = False) -> list[int]:
    """Remove all but the newest `keep` complete exports, and every half-written one: newer
    than LATEST (only at start; a running job may be writing it) or without a manifest.
    Returns the epochs removed."""
    if not os.path.isdir(job_dir):
        return []
    latest = read_latest(job_dir)
    if latest is None:
        return []   # no marker (never written, or lost): nothing here is trusted, nothing removed
    kept = set(complete_exports(job_dir)[:keep])
    found = {int(m.group(1)) for m in (re.match(r"^e(\d+)(\.h5|\.json)?(\.tmp\d+)?$", x) for x in os.listdir(job_dir))
             if m}
    removed = sorted(e for e in found if e not in kept and not (running and e > latest))
    for e in removed:
        remove_export(job_dir, e)
    return removed


__all__ = ["Manifest", "ExportError", "export_paths", "read_latest", "write_latest", "complete_exports",
           "load_manifest", "remove_export", "tidy", "write_durably", "fsync_path"]
