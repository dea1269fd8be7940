"""HDF5 files of an export: a rank file per rank, the master with virtual datasets, and
the checked reads that restore uses.  Serial h5py only (each rank writes its own file).

Every exported block is written in chunks of `chunk_rows` rows along its first axis; each
chunk's CRC32C is stored beside it (dataset ``/.crc/<name>``), so a restore that reads
only some rows of a block still checks every byte it uses.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from . import _native
from .errors import HeapError
from .heap import _dtype_parse
from .manifest import ExportError, Manifest, fsync_path
from .plan import whole

CHUNK_BYTES = 4 << 20
KIND_NAMES = {1: "array", 2: "pool", 3: "table"}
TABLE_HEADER = 64   # a table object: a 64-byte header (magic, length, row size, flags), then the rows


def file_dtype(dt: np.dtype) -> np.dtype:
    """The dtype stored in HDF5: dt itself where h5py maps it, else opaque bytes of its size."""
    import h5py

    try:
        h5py.h5t.py_create(dt, logical=True)
        return dt
    except (TypeError, ValueError):
        return np.dtype(f"V{dt.itemsize}")


def committed_rows(read_epoch: Callable, desc: dict, epoch: int, r0: int, r1: int) -> tuple[np.ndarray, int | None]:
    """Rows [r0, r1) of an object (a pool's objects, an array's first axis) as committed at
    `epoch`, and their CRC32C when the units read were exactly those rows (else None)."""
    dt = _dtype_parse(desc["dtype"])
    size, count = desc["obj_size"], desc["count"]
    if desc["kind"] == 3:                           # a table: rows after its header, 64-byte units
        lo, hi = TABLE_HEADER + r0 * dt.itemsize, TABLE_HEADER + r1 * dt.itemsize
        if hi <= lo:
            return np.empty((r1 - r0,), dt), None
        u0, u1 = lo // 64, -(-hi // 64)
        buf = np.empty((u1 - u0) * 64, np.uint8)
        crc = read_epoch(desc["index"], epoch, u0, u1, buf)
        exact = lo == u0 * 64 and hi == u1 * 64
        return buf[lo - u0 * 64:hi - u0 * 64].view(dt), crc if exact else None
    if desc["kind"] == 2:
        full, lo, hi = [count, *desc["shape"]], r0 * size, r1 * size
    else:
        full = list(desc["shape"]) or [1]
        row = int(np.prod(full[1:], dtype=np.int64)) * dt.itemsize
        lo, hi = r0 * row, r1 * row
    total = size * count
    if hi <= lo:
        return np.empty((r1 - r0, *full[1:]), dt), None
    if desc["kind"] == 2 and size > 2048:          # objects of whole pages: ppo units each
        ppo = -(-size // 4096)
        u0, u1, base, end = r0 * ppo, r1 * ppo, lo, hi
    elif desc["kind"] == 2 and count > 1:           # one unit per small object
        u0, u1, base, end = r0, r1, lo, hi
    elif total > 2048:                              # an array of whole pages: a unit per page
        u0, u1 = lo // 4096, -(-hi // 4096)
        base, end = u0 * 4096, min(total, u1 * 4096)
    else:                                           # one small unit
        u0, u1, base, end = 0, 1, 0, total
    buf = np.empty(end - base, np.uint8)
    crc = read_epoch(desc["index"], epoch, u0, u1, buf)
    exact = lo == base and hi == end
    return buf[lo - base:hi - base].view(dt).reshape(r1 - r0, *full[1:]), crc if exact else None


def table_header(read_epoch: Callable, desc: dict, epoch: int) -> tuple[int, int]:
    """(length, flags) of a table as committed at `epoch` (its header unit, checked)."""
    buf = np.empty(64, np.uint8)
    read_epoch(desc["index"], epoch, 0, 1, buf)
    words = buf.view("<u8")
    if int(words[0]) != 0x31454C4241544B48 or int(words[2]) != _dtype_parse(desc["dtype"]).itemsize:
        raise ExportError(f"table {desc['name']!r}: its committed header at epoch {epoch} is damaged")
    return int(words[1]), int(words[3])


def _interior(desc: dict) -> tuple[tuple[slice, ...], list[int]]:
    """Slices of the exported part of the local object, and its shape (halo stripped)."""
    if desc["kind"] == 3:
        return (slice(0, desc["length"]),), [desc["length"]]
    if desc["kind"] == 2:
        full = [desc["count"], *desc["shape"]]
        return tuple(slice(0, n) for n in full), full
    halo = (desc["layout"] or {}).get("halo") or [0] * len(desc["shape"])
    sl = tuple(slice(w, n - w) for n, w in zip(desc["shape"], halo))
    return sl, [n - 2 * w for n, w in zip(desc["shape"], halo)]


def write_rank_file(path: str, rel: str, read_epoch: Callable, epoch: int, meta: dict, descs: list[dict],
                    ident: dict) -> list[dict]:
    """Write the committed objects `descs` of one rank to `path` (fsynced); returns their blocks.

    `rel` is the file's path relative to the job directory (recorded in the manifest).
    """
    import h5py

    blocks = []
    with h5py.File(path, "w") as f:
        f.attrs["hpcckpt_epoch"] = epoch
        f.attrs["hpcckpt_meta"] = json.dumps(meta, sort_keys=True)
        for k, v in ident.items():
            f.attrs[f"hpcckpt_{k}"] = v
        crcs_group = f.create_group(".crc")
        for d in descs:
            blocks.append(_write_object(f, crcs_group, rel, read_epoch, epoch, d))
        f.flush()
    fsync_path(path)
    return blocks


def _prefetched(read: Callable, spans: list[tuple[int, int]]):
    """read(*span) for each span, the next one running in a thread (native reads drop the GIL)
    while the caller writes the current one with h5py."""
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, *spans[0]) if spans else None
        for i in range(len(spans)):
            done = ahead.result()
            if i + 1 < len(spans):
                ahead = pool.submit(read, *spans[i + 1])
            yield done


def _write_object(f, crcs_group, rel: str, read_epoch: Callable, epoch: int, d: dict) -> dict:
    if d["kind"] == 3:   # a table: its committed length; a distributed one is placed by the manifest
        n, flags = table_header(read_epoch, d, epoch)
        d = dict(d, length=n, layout={"global_shape": [n], "offset": [0], "halo": [0], "replicated": False,
                                      "table": True} if flags & 1 else None)
    dt = _dtype_parse(d["dtype"])
    fdt = file_dtype(dt)
    inner, shape = _interior(d)
    ds = f.create_dataset(d["name"], shape=tuple(shape), dtype=fdt)
    rows = shape[0] if shape else 1
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize if shape else dt.itemsize
    chunk_rows = max(1, CHUNK_BYTES // max(1, row_bytes))
    start = inner[0].start if inner else 0
    crc, chunk_crcs = 0, []
    spans = [(a, min(rows, a + chunk_rows)) for a in range(0, rows if row_bytes else 0, chunk_rows)]
    reads = _prefetched(lambda a, b: committed_rows(read_epoch, d, epoch, start + a, start + b), spans)
    for (a, b), (part, part_crc) in zip(spans, reads):
        whole_rows = all(s.start == 0 and s.stop == n for s, n in zip(inner[1:], part.shape[1:]))
        part = np.ascontiguousarray(part[(slice(None), *inner[1:])] if shape else part.reshape(()))
        raw = part.view(np.uint8).reshape(-1) if part.size else np.empty(0, np.uint8)
        chunk_crcs.append(part_crc if part_crc is not None and whole_rows and raw.size else _native.crc32c(raw))
        crc = _native.crc32c_combine(crc, chunk_crcs[-1], raw.size)
        ds[(slice(a, b),) if shape else ()] = part.view(fdt) if fdt != dt else part
    crc_arr = np.array(chunk_crcs, "<u4")
    crcs_group.create_dataset(d["name"], data=crc_arr)
    lay = d["layout"]
    offset = list(lay["offset"]) if lay else [0] * len(shape)
    if d["kind"] == 2:
        offset = offset[:1] + [0] * (len(shape) - 1)
    attrs = {"dtype": d["dtype"], "kind": KIND_NAMES[d["kind"]], "crc32c": crc, "chunk_rows": chunk_rows,
             "offset": json.dumps(offset), "layout": json.dumps(lay)}
    for k, v in attrs.items():
        ds.attrs[k] = v
    block = {"name": d["name"], "kind": KIND_NAMES[d["kind"]], "dtype": d["dtype"], "element_shape":
             list(d["shape"]) if d["kind"] == 2 else [], "layout": lay, "offset": offset, "shape": shape,
             "halo": (lay or {}).get("halo") or [0] * len(shape), "file": rel, "dataset": d["name"],
             "crc32c": crc, "chunk_rows": chunk_rows, "chunks_crc32c": _native.crc32c(crc_arr.tobytes()),
             "nchunks": len(chunk_crcs)}
    if d["kind"] == 1:   # ghost cells on the global edge are state (the boundary condition): kept beside
        from .ghosts import write_edges
        edges = write_edges(f, crcs_group, rel, lambda r0, r1: committed_rows(read_epoch, d, epoch, r0, r1)[0],
                            d, dt, fdt)
        if edges:
            block["edges"] = edges
    return block


def write_master(job_dir: str, m: Manifest) -> str:
    """The master ``e<E>.h5``: a virtual dataset per distributed or replicated object (sources
    by relative path), rank-private objects as external links under ``rank<r>/``."""
    import h5py

    path = os.path.join(job_dir, f"e{m.epoch}.h5")
    tmp = f"{path}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        f.attrs["hpcckpt_epoch"] = m.epoch
        f.attrs["hpcckpt_meta"] = json.dumps(m.meta, sort_keys=True)
        f.attrs["hpcckpt_world_size"] = m.world_size
        f.attrs["hpcckpt_job"] = m.job
        f.attrs["hpcckpt_step"] = m.meta.get("step", -1) if isinstance(m.meta.get("step"), int) else -1
        f.attrs["hpcckpt_note"] = (f"hpcckpt export of job {m.job!r}, epoch {m.epoch}: datasets read through "
                                   "the rank files under e<epoch>/. A missing or damaged rank file reads as the "
                                   "fill value (NaN for floating types, the most negative or largest value for "
                                   "integers) or as wrong values: check with `hpcckpt verify` before use")
        for name, obj in sorted(m.objects.items()):
            if not obj["distributed"] and not obj["replicated"]:
                for b in obj["blocks"]:
                    f.require_group(f"rank{b['rank']}")[name] = h5py.ExternalLink(b["file"], b["dataset"])
                continue
            fdt = file_dtype(_dtype_parse(obj["dtype"]))
            if not all(obj["global_shape"]):   # an empty table: nothing to map
                f.create_dataset(name, shape=tuple(obj["global_shape"]), dtype=fdt)
                continue
            layout = h5py.VirtualLayout(shape=tuple(obj["global_shape"]), dtype=fdt)
            fill = _missing(fdt)
            for b in obj["blocks"]:
                if not all(b["shape"]):   # a rank that holds no rows of a table
                    continue
                src = h5py.VirtualSource(b["file"], b["dataset"], shape=tuple(b["shape"]))
                layout[tuple(slice(o, o + n) for o, n in zip(b["offset"], b["shape"]))] = src
            f.create_virtual_dataset(name, layout, fillvalue=fill)
            f[name].attrs["hpcckpt_epoch"] = m.epoch
        f.flush()
    fsync_path(tmp)
    os.replace(tmp, path)
    return path


def _missing(dtype: np.dtype):
    """The fill value of a virtual dataset, so that data a missing rank file should hold shows:
    NaN for floating types, the most negative value for signed and the largest for unsigned
    integers; None (HDF5's zeros) for other types."""
    if dtype.kind in "fc":
        return np.array(np.nan, dtype)[()]
    if dtype.kind == "i":
        return np.iinfo(dtype).min
    if dtype.kind == "u":
        return np.iinfo(dtype).max
    return None


class BlockReader:
    """Checked reads of exported blocks: every chunk used is compared with its CRC."""

    def __init__(self, job_dir: str):
        self.job_dir = job_dir
        self._files: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._crcs: dict[tuple[str, str], np.ndarray] = {}

    def _file(self, rel: str):
        import h5py

        if rel not in self._files:
            path = os.path.join(self.job_dir, rel)
            if not os.path.exists(path):
                raise ExportError(f"{path}: rank file is missing")
            try:
                self._files[rel] = h5py.File(path, "r")
            except OSError as e:
                raise ExportError(f"{path}: cannot be read as HDF5 (truncated or damaged?): {e}") from None
        return self._files[rel]

    def _chunk_crcs(self, b: dict) -> np.ndarray:
        key = (b["file"], b["dataset"])
        if key not in self._crcs:
            where = f"{os.path.join(self.job_dir, b['file'])}: {b['dataset']!r}"
            try:
                arr = np.asarray(self._file(b["file"])[".crc"][b["dataset"]][()], "<u4")
            except (KeyError, OSError, ValueError) as e:
                raise ExportError(f"{where}: chunk checksums are missing or unreadable ({e})") from None
            if _native.crc32c(arr.tobytes()) != b["chunks_crc32c"] or arr.size != b["nchunks"]:
                raise ExportError(f"{where}: chunk checksums do not match the manifest (damaged file)")
            self._crcs[key] = arr
        return self._crcs[key]

    def block_crc(self, b: dict, nbytes: int) -> int:
        """The CRC32C of a whole block of `nbytes`, combined from its (checked) chunk CRCs."""
        crcs = self._chunk_crcs(b)
        per = nbytes // max(1, b["shape"][0]) * b["chunk_rows"] if b["shape"] else nbytes
        crc = 0
        for i, c in enumerate(crcs.tolist()):
            crc = _native.crc32c_combine(crc, c, min(per, nbytes - i * per))
        return crc

    def read(self, b: dict, dtype: np.dtype, src: tuple[slice, ...]) -> np.ndarray:
        """The part `src` of block `b`, every chunk it touches checked."""
        where = f"{os.path.join(self.job_dir, b['file'])}: {b['dataset']!r}"
        f = self._file(b["file"])
        crcs = self._chunk_crcs(b)
        try:
            ds = f[b["dataset"]]
            if list(ds.shape) != list(b["shape"]):
                raise ExportError(f"{where}: shape {list(ds.shape)} does not match the manifest's {b['shape']}")
            if not b["shape"]:
                chunks, lo, data = [0], 0, np.asarray(ds[()]).reshape(1)
            else:
                k = b["chunk_rows"]
                c0, c1 = src[0].start // k, -(-src[0].stop // k)
                lo = c0 * k
                data = ds[lo:min(b["shape"][0], c1 * k)]
                chunks = range(c0, c1)
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ExportError(f"{where}: cannot be read ({e})") from None
        data = np.ascontiguousarray(data).view(dtype) if data.dtype != dtype else np.ascontiguousarray(data)
        raw = data.view(np.uint8).reshape(-1)
        per = raw.size // max(1, data.shape[0]) if b["shape"] else raw.size
        for i, c in enumerate(chunks):
            rows = b["chunk_rows"] if b["shape"] else 1
            piece = raw[i * rows * per:(i + 1) * rows * per]
            if c >= crcs.size or _native.crc32c(piece) != int(crcs[c]):
                end = min(b["shape"][0], c * rows + rows) if b["shape"] else 1
                raise ExportError(f"{where}: rows {c * rows}..{end} do not match their checksum "
                                  "(damaged data)")
        if not b["shape"]:
            return data.reshape(())
        return data[(slice(src[0].start - lo, src[0].stop - lo), *src[1:])]

    def read_into(self, b: dict, dtype: np.dtype, src: tuple[slice, ...], out: np.ndarray) -> bool:
        """Read the rows `src` of block `b` straight into `out` (C-contiguous, their shape) and
        check them there; False when that cannot be done (partial rows, converted dtype)."""
        if not b["shape"] or not out.flags.c_contiguous or not whole(src[1:], b["shape"][1:]):
            return False
        ds = self._file(b["file"])[b["dataset"]]
        if ds.dtype != dtype or list(ds.shape) != list(b["shape"]):
            return False
        k, crcs, lo, hi = b["chunk_rows"], self._chunk_crcs(b), src[0].start, src[0].stop
        rows = out.view(np.uint8).reshape(hi - lo, -1) if out.size else None
        for c in range(lo // k, -(-hi // k)):
            a, z = c * k, min(b["shape"][0], (c + 1) * k)
            if a < lo or z > hi:   # a chunk that sticks out of the piece: check it whole, elsewhere
                part = self.read(b, dtype, (slice(max(a, lo), min(z, hi)), *src[1:]))
                out[max(a, lo) - lo:min(z, hi) - lo] = part
                continue
            try:
                ds.read_direct(out, np.s_[a:z], np.s_[a - lo:z - lo])
            except (OSError, ValueError, TypeError) as e:
                raise ExportError(f"{os.path.join(self.job_dir, b['file'])}: {b['dataset']!r} cannot be read ({e})") \
                    from None
            if c >= crcs.size or _native.crc32c(rows[a - lo:z - lo]) != int(crcs[c]):
                raise ExportError(f"{os.path.join(self.job_dir, b['file'])}: {b['dataset']!r}: rows {a}..{z} do not "
                                  "match their checksum (damaged data)")
        return True

    def fill(self, b: dict, dtype: np.dtype, src: tuple[slice, ...], heap: Any, index: int, byte_off: int,
             stride: int | None = None) -> bool:
        """Copy the rows `src` of block `b` from the rank file into the new object `index` of
        `heap`, row k at byte `byte_off + k * stride` of its objects laid end to end (`stride`:
        the row's size, by default): whole chunks by the C core (read, checked and written by
        the file system, no page of the heap mapped), the chunks that stick out of the piece
        checked whole and written from memory.  False when that cannot be done (partial rows,
        a converted dtype, a dataset not stored contiguous)."""
        if not b["shape"] or not whole(src[1:], b["shape"][1:]):
            return False
        path = os.path.join(self.job_dir, b["file"])
        ds = self._file(b["file"])[b["dataset"]]
        if ds.dtype != dtype or list(ds.shape) != list(b["shape"]):
            return False
        at = _raw_offset(ds)
        if at is None:
            return False
        if b["file"] not in self._fds:
            self._fds[b["file"]] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fd, k, crcs = self._fds[b["file"]], b["chunk_rows"], self._chunk_crcs(b)
        per = int(np.prod(b["shape"][1:], dtype=np.int64)) * dtype.itemsize
        stride = stride or per
        lo, hi = src[0].start, src[0].stop
        with heap._lock:
            for c in range(lo // k, -(-hi // k)):
                a, z = c * k, min(b["shape"][0], (c + 1) * k)
                try:
                    if a < lo or z > hi:   # a chunk that sticks out of the piece: checked whole, in memory
                        part = np.ascontiguousarray(self.read(b, dtype, (slice(max(a, lo), min(z, hi)), *src[1:])))
                        heap._native.fill_bytes(index, byte_off + (max(a, lo) - lo) * stride, per, stride,
                                                part.view(np.uint8))
                        continue
                    crc = heap._native.fill(index, byte_off + (a - lo) * stride, per, stride, fd, at + a * per,
                                            (z - a) * per)
                except (OSError, HeapError) as e:
                    raise ExportError(f"{path}: {b['dataset']!r} cannot be read ({e})") from None
                if c >= crcs.size or crc != int(crcs[c]):
                    raise ExportError(f"{path}: {b['dataset']!r}: rows {a}..{z} do not match their checksum "
                                      "(damaged data)")
        return True

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _raw_offset(ds) -> int | None:
    """Where a dataset's bytes start in its file, if they lie there whole and as they are
    (contiguous layout, no filter, all of it allocated); else None."""
    import h5py

    try:
        if ds.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
            return None
        at = ds.id.get_offset()
        if at is None or ds.id.get_storage_size() != ds.size * ds.dtype.itemsize:
            return None
        return int(at)
    except (OSError, ValueError, TypeError):
        return None


__all__ = ["write_rank_file", "write_master", "BlockReader", "committed_rows", "file_dtype", "table_header",
           "CHUNK_BYTES"]
