"""``hpcckpt info | verify`` of a running job: read-only, without the heap's lock.

A running rank holds its heap's lock, so the commands look at it the way the background
export helper does: through a read-only mapping that takes no lock and writes nothing
(``open_peek``). They read the newest epoch the heap has prepared, its metadata and its time,
and ``verify`` reads every committed copy of that epoch and checks each against its CRC. The
copies of epoch E stay untouched until the job prepares E+2; if it does so during a verify,
the check starts again at the newer epoch.

>>> describe_live("/dev/shm/hpcckpt-me/demo/rank0.heap")["state"]   # doctest: +SKIP
'running: last checkpoint epoch 12 (step 120), 3 s ago'
"""
from __future__ import annotations

import json
import os
import struct
import time

from . import _native
from .errors import HeapError, translate
from .export import open_peek as _open_peek
from .heap import _call
from .h5io import committed_rows
from .manifest import complete_exports, read_latest

_RECORD = 1592            # struct hk_record (native/layout.h): magic, epoch, time_ns, ..., meta_len, meta, crc
_RECORD_MAGIC = 0x4554415453434B48
_STATE_PAGES = (1, 2, 3, 4)   # two copies of each of the two record slots
_CHUNK = 4 << 20          # bytes read at a time by a live verify


def epoch_record(path: str, epoch: int) -> dict | None:
    """Time (seconds since the epoch) and metadata of epoch `epoch` as its heap file records
    them, from an intact copy of its record; None when no intact copy names that epoch."""
    try:
        with open(path, "rb") as f:
            for page in _STATE_PAGES:
                raw = os.pread(f.fileno(), _RECORD, page * 4096)
                if len(raw) < _RECORD:
                    continue
                magic, e, t = struct.unpack_from("<QQQ", raw)
                (n,), (crc,) = struct.unpack_from("<I", raw, 48), struct.unpack_from("<I", raw, _RECORD - 4)
                if magic == _RECORD_MAGIC and e == epoch and n <= 1536 and _native.crc32c(raw[:-4]) == crc:
                    return {"time": t / 1e9, "meta": json.loads(raw[52:52 + n] or b"{}")}
    except (OSError, ValueError):
        pass
    return None


def age_text(seconds: float) -> str:
    """'3 s', '4 min', '2.5 h' for a duration.

    >>> age_text(3.2), age_text(250), age_text(9000)
    ('3 s', '4 min', '2.5 h')
    """
    if seconds < 120:
        return f"{max(0, round(seconds))} s"
    return f"{round(seconds / 60)} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def open_peek(path: str):
    """A read-only, unlocked handle on a heap (as the export helper reads a live one)."""
    return _call(_open_peek, path)


def _objects(native) -> list[dict]:
    """Every live object of a peeked heap as a descriptor ``committed_rows`` reads."""
    out, i = [], native.next_live(0)
    while i >= 0:
        name, dtype, shape, size, count, kind = native.lookup(i)
        out.append({"index": i, "name": name, "dtype": dtype, "shape": list(shape), "obj_size": size,
                    "count": count, "kind": kind})
        i = native.next_live(i + 1)
    return out


def describe_live(path: str) -> dict:
    """What ``hpcckpt info`` shows of a heap that a running process has open."""
    native = open_peek(path)
    try:
        i = native.info()
        epoch = i["prepared"] or None
        rec = epoch_record(path, epoch) if epoch else None
        meta = rec["meta"] if rec else {}
        age = time.time() - rec["time"] if rec else None
        objects = len([o for o in _objects(native) if "/" not in o["name"]])   # hidden ones hold a '/' 
    finally:
        native.abandon()
    step = f" (step {meta['step']})" if "step" in meta else ""
    when = f", {age_text(age)} ago" if age is not None else ""
    return {"path": path, "job": i["job"], "rank": i["rank"], "world_size": i["world_size"],
            "format": f"{i['major']}.{i['minor']}", "capacity": i["capacity"], "used_bytes": None,
            "objects": objects, "epoch": epoch, "meta": meta, "running": True, "age_seconds": age,
            "state": f"running: last checkpoint epoch {epoch}{step}{when}" if epoch else "running: no checkpoint yet",
            "dax": i["dax"], "restorable": epoch,
            "copy": "partner" if os.path.basename(path).startswith("partner-") else "local"}


def verify_live(path: str, tries: int = 3) -> tuple[dict, str]:
    """Read every committed copy of the newest epoch of a running heap, each checked against its
    CRC; raises HeapError naming the object when one does not match."""
    for attempt in range(tries):
        native = open_peek(path)
        try:
            epoch, nbytes, objs = native.info()["prepared"], 0, _objects(native)
            if not epoch:
                return {"epoch": None, "objects": 0, "bytes": 0, "running": True}, "running, nothing committed yet"
            try:
                for d in objs:
                    rows = d["count"] if d["kind"] == 2 else (d["shape"][0] if d["shape"] else 1)
                    row_bytes = max(1, d["obj_size"] * d["count"] // max(1, rows))
                    step = max(1, _CHUNK // row_bytes)
                    for r0 in range(0, rows, step):
                        data, _ = committed_rows(native.read_epoch, d, epoch, r0, min(rows, r0 + step))
                        nbytes += data.nbytes
            except (HeapError, OSError) as e:
                again = open_peek(path)
                moved = again.info()["prepared"] >= epoch + 2   # the job reused these copies meanwhile
                again.abandon()
                if moved and attempt + 1 < tries:
                    continue
                raise (translate(e) if isinstance(e, OSError) else e) from None
        finally:
            native.abandon()
        return ({"epoch": epoch, "objects": len(objs), "bytes": nbytes, "running": True},
                f"running, epoch {epoch}: {len(objs)} objects ({nbytes} bytes) of committed copies verified")
    raise HeapError(f"{path}: the job checkpoints faster than its copies can be read; try again")


def export_state(job_dir: str) -> dict:
    """The export level of a job as its directory shows it: LATEST, the complete exports, and
    an export being written (a directory e<E>/ newer than LATEST, without a manifest yet)."""
    if not os.path.isdir(job_dir):
        return {"dir": job_dir, "latest": None, "complete": [], "in_progress": []}
    latest, complete = read_latest(job_dir), complete_exports(job_dir)
    writing = sorted(int(f[1:]) for f in os.listdir(job_dir)
                     if f[:1] == "e" and f[1:].isdigit() and os.path.isdir(os.path.join(job_dir, f))
                     and int(f[1:]) > (latest or 0) and not os.path.exists(os.path.join(job_dir, f"{f}.json")))
    return {"dir": job_dir, "latest": latest, "complete": complete, "in_progress": writing}


__all__ = ["describe_live", "verify_live", "export_state", "epoch_record", "age_text"]
