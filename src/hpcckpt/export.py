"""Export committed epochs to HDF5, collectively, in the foreground or in the background.

Each rank writes ``e<E>/rank<r>.h5`` from the *committed* shadow copies of epoch E (never the
working data); rank 0 then writes the master ``e<E>.h5`` and the manifest ``e<E>.json``, and
only then replaces ``LATEST``.  In the background a helper process per rank (spawned, not
forked) reads the heap file through its own read-only mapping and writes the rank file while
the application computes: the slots of E stay intact until epoch E+2 prepares, so only that
checkpoint waits for it (and the one after E if it frees objects, since a commit wipes
freed space).  Measured against a thread, see README "Decisions".

>>> handle = heap.export(wait=False)     # doctest: +SKIP
>>> handle.wait()                       # doctest: +SKIP  (collective)
'/scratch/exports/demo/e7.h5'
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

from . import _native, deadline
from .h5io import write_master, write_rank_file
from .heap import Heap, crash_hook
from .manifest import ExportError, Manifest, export_paths, tidy, write_durably, write_latest

KEEP = 2   # complete exports kept


def rank_descs(heap: Heap, rank: int) -> list[dict]:
    """The objects this rank exports: all of them, but replicated ones only from rank 0."""
    descs = [heap.describe(n) for n in heap]
    return [d for d in descs if rank == 0 or not (d["layout"] or {}).get("replicated")]


def rank_request(heap: Heap, job_dir: str, job: str, epoch: int, rank: int, size: int, meta: dict) -> dict:
    rel = os.path.join(f"e{epoch}", f"rank{rank}.h5")
    return {"op": "rank", "heap": heap.path, "epoch": epoch, "file": os.path.join(job_dir, rel), "rel": rel,
            "meta": meta, "descs": rank_descs(heap, rank),
            "ident": {"rank": rank, "world_size": size, "job": job}}


def run_rank_request(req: dict, read_epoch: Callable) -> list[dict]:
    """Write one rank file as `req` says, reading committed copies through `read_epoch`."""
    os.makedirs(os.path.dirname(req["file"]), exist_ok=True)
    blocks = write_rank_file(req["file"], req["rel"], read_epoch, req["epoch"], req["meta"], req["descs"],
                             req["ident"])
    hook = crash_hook(req["ident"]["rank"])
    if hook and hook[0] == "mid-export" and hook[1] in (0, req["epoch"]):   # test hook: the rank dies here
        if os.environ.get("HPCCKPT_EXPORT_HELPER"):
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    for b in blocks:
        b["rank"] = req["ident"]["rank"]
    write_durably(sidecar(os.path.dirname(os.path.dirname(req["file"])), req["epoch"], req["ident"]["rank"]),
                  json.dumps(blocks).encode())
    return blocks


def sidecar(job_dir: str, epoch: int, rank: int) -> str:
    """Where a rank leaves its blocks (JSON) once its rank file is durable."""
    return os.path.join(job_dir, f"e{epoch}", f"rank{rank}.json")


def finish_from_sidecars(job_dir: str, job: str, epoch: int, size: int, meta: dict, prune: bool = True) -> str:
    """Rank 0's helper: the manifest from every rank's sidecar, then master, manifest, LATEST."""
    per_rank = []
    for r in range(size):
        path = sidecar(job_dir, epoch, r)
        try:
            with open(path) as f:
                per_rank.append(json.load(f))
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: the blocks of rank {r} are missing or damaged ({e})") from None
    return finish(job_dir, build_manifest(job, epoch, size, meta, per_rank), prune)


def build_manifest(job: str, epoch: int, size: int, meta: dict, per_rank: list[list[dict]]) -> Manifest:
    """Merge every rank's blocks into one manifest (rank 0)."""
    objects: dict[str, dict] = {}
    for blocks in per_rank:
        for b in blocks:
            lay = b.pop("layout")
            obj = objects.setdefault(b["name"], {
                "kind": b["kind"], "dtype": b["dtype"], "element_shape": b["element_shape"],
                "distributed": bool(lay) and not lay["replicated"], "replicated": bool(lay and lay["replicated"]),
                "global_shape": (list(lay["global_shape"]) + list(b["element_shape"])) if lay else None,
                "blocks": []})
            if obj["dtype"] != b["dtype"] or bool(obj["distributed"]) != (bool(lay) and not lay["replicated"]):
                raise ExportError(f"object {b['name']!r} is distributed on some ranks and private, or of another "
                                  "dtype, on others; give it one declaration on every rank")
            for k in ("name", "kind", "dtype", "element_shape"):
                b.pop(k)
            obj["blocks"].append(b)
    for obj in objects.values():   # a distributed table: the ranks' rows one after the other, in rank order
        if obj["kind"] == "table" and obj["distributed"]:
            start = 0
            for b in sorted(obj["blocks"], key=lambda b: b["rank"]):
                b["offset"], b["rows"] = [start], b["shape"][0]
                start += b["shape"][0]
            obj["global_shape"] = [start]
    return Manifest(job=job, epoch=epoch, world_size=size, meta=meta, objects=objects)


def finish(job_dir: str, m: Manifest, prune: bool = True) -> str:
    """Master, manifest, then LATEST (each durable before the next); then older exports pruned
    (the helper prunes after it has replied: freeing a GiB takes a while)."""
    master = write_master(job_dir, m)
    p = export_paths(job_dir, m.epoch)
    write_durably(p["manifest"], m.to_json().encode())
    write_latest(job_dir, m.epoch)
    if prune:
        tidy(job_dir, keep=KEEP, running=True)
    return master


def umask_for(mode: int) -> int:
    """The umask that gives new files `mode` and new directories the same plus the matching
    search bits: 0o600 -> 0o077 (private), 0o640 -> 0o027, 0o644 -> 0o022.

    >>> oct(umask_for(0o640))
    '0o27'
    """
    return 0o777 & ~(mode | (mode & 0o444) >> 2)


class Helper:
    """A helper process that writes rank files (and, on rank 0, masters) in the background.

    Requests go as JSON lines on its stdin; replies come back in order on its stdout.
    """

    def __init__(self, mode: int = 0o600) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HPCCKPT_EXPORT_HELPER="1",
                   HPCCKPT_EXPORT_UMASK=str(umask_for(mode)))
        self.proc = subprocess.Popen([sys.executable, "-m", "hpcckpt._export_helper"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, close_fds=True)
        self._sent = 0
        self._got: list[dict] = []

    def send(self, req: dict) -> int:
        """Queue a request; returns its ticket."""
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass   # the reply read reports the dead helper
        self._sent += 1
        return self._sent - 1

    def _read_one(self) -> None:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.poll()
            self._got.append({"ok": False, "error": f"export helper process died (exit {code})"})
            return
        try:
            self._got.append(json.loads(line))
        except ValueError:
            self._got.append({"ok": False, "error": f"export helper said {line.strip()[:200]!r}"})

    def ready(self, ticket: int) -> bool:
        """Has the reply to `ticket` arrived (never blocks)?"""
        while len(self._got) <= ticket:
            if self.proc.stdout.closed or not select.select([self.proc.stdout], [], [], 0)[0]:
                return False
            self._read_one()
        return True

    def result(self, ticket: int) -> dict:
        """The reply to `ticket` (blocks until it arrives)."""
        while len(self._got) <= ticket:
            self._read_one()
        return self._got[ticket]

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class ExportHandle:
    """One export of one epoch; ``wait()`` (collective) returns the master's path once durable.

    States: ``writing`` (rank files), ``finishing`` (rank 0's helper writes master, manifest
    and LATEST), ``done`` or ``failed``.
    """

    def __init__(self, exporter: Exporter, epoch: int, meta: dict, ticket: int | None):
        self.exporter, self.epoch, self.meta, self._ticket = exporter, epoch, meta, ticket
        self._finish_ticket: int | None = None
        self.error: str | None = None
        self.path: str | None = None
        self.state = "writing"

    def local_vote(self) -> float:
        """0: this rank's file is still being written; 1: written; 2: failed (never blocks)."""
        if self._ticket is not None and not self.exporter.helper.ready(self._ticket):
            return 0.0
        self._take_local()
        return 2.0 if self.error else 1.0

    def _take_local(self) -> None:
        """Wait for this rank's file (blocks)."""
        if self._ticket is not None:
            r = self.exporter.helper.result(self._ticket)
            self._ticket = None
            if not r.get("ok"):
                self.error = r.get("error", "unknown")

    def finalize(self, failed_ranks: list[int]) -> None:
        """Every rank's file is written (or some failed): rank 0 starts the master, in the background."""
        ex = self.exporter
        if failed_ranks:
            self.state = "failed"
            self.error = self.error or f"the rank file of rank(s) {failed_ranks} could not be written"
            return
        self.state = "finishing"
        if ex.comm.Get_rank() == 0:
            self._finish_ticket = ex.helper.send({"op": "finish", "job_dir": ex.job_dir, "job": ex.job,
                                                  "epoch": self.epoch, "world_size": ex.comm.Get_size(),
                                                  "meta": self.meta})

    def settle(self, block: bool) -> None:
        """Rank 0: take the master's reply (if it is there, or waiting for it)."""
        t = self._finish_ticket
        if t is None or not (block or self.exporter.helper.ready(t)):
            return
        r = self.exporter.helper.result(t)
        self._finish_ticket = None
        self.state, self.path, self.error = ("done", r["master"], None) if r.get("ok") else \
            ("failed", None, r.get("error", "unknown"))

    def wait(self) -> str:
        """Collective: block until the export is durable (LATEST names it); returns the master path.

        Raises ExportError on every rank if any rank's part failed; the previous export stays LATEST.
        """
        ex = self.exporter
        if self.state == "writing":
            self._take_local()
            errors = deadline.allgather(ex.comm, self.error, f"the export of epoch {self.epoch} (every rank's file)")
            self.finalize([r for r, e in enumerate(errors) if e])
            self.error = self.error or next((e for e in errors if e), None)
        if ex.comm.Get_rank() == 0:
            self.settle(block=True)
        self.state, self.path, self.error = deadline.bcast(ex.comm, (self.state, self.path, self.error),
                                                           f"the export of epoch {self.epoch} (rank 0's master)")
        if ex.inflight is self:
            ex.inflight = None
        if self in ex.finishing:
            ex.finishing.remove(self)
        if self.state != "done":
            raise ExportError(f"export of epoch {self.epoch} to {ex.job_dir} failed: {self.error}; "
                              "LATEST still names the previous export")
        return self.path


class Exporter:
    """Takes part in every coordinated checkpoint of one heap: exports every K-th epoch in the
    background (skipping one whose predecessor is still being written: compute never waits
    for that), waits for a rank file only where the protocol needs it, and finishes an export
    once the vote says every rank's file is written.  No collective of its own."""

    def __init__(self, comm, job: str, export_dir: str, every: int = 0, mode: int = 0o600):
        self.comm, self.job, self.every, self.mode = comm, job, every, mode
        self.job_dir = os.path.join(os.path.abspath(export_dir), job)
        self.helper: Helper | None = None
        self.inflight: ExportHandle | None = None      # rank files being written
        self.last: ExportHandle | None = None          # the newest export started
        self.finishing: list[ExportHandle] = []         # rank 0: masters being written
        self.stall = 0.0      # seconds the application waited for background exports, in all
        self.parts = {"t_wait": 0.0, "t_vote": 0.0, "t_start": 0.0}   # ... split by where
        self.started = self.skipped = 0

    def start(self, heap: Heap, wait: bool) -> ExportHandle:
        """Collective: export the last committed epoch of `heap`."""
        epoch = heap._info()["committed"]
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        same = self.inflight if self.inflight is not None else self.last
        if same is not None and same.epoch == epoch:   # this epoch is exported already, or on its way
            if not wait:
                return same
            try:
                same.wait()   # collective; its outcome is the same on every rank
                return same
            except ExportError:
                pass          # it failed everywhere: export it again
        if self.inflight is not None:
            self.inflight.wait()
        if not epoch:
            raise ExportError(f"{heap.path}: nothing is committed yet; checkpoint before exporting")
        meta = heap.meta
        req = rank_request(heap, self.job_dir, self.job, epoch, rank, size, meta)
        self._replace_dead_helper()
        self.warm_up()
        handle = ExportHandle(self, epoch, meta, self.helper.send(req))
        self.inflight = self.last = handle
        self.started += 1
        if wait:   # the same helper, waited for: it reads the file through its own mapping, overlapped
            handle.wait()
        return handle

    def adopt(self, epoch: int, meta: dict) -> None:
        """The export a restore came from is epoch's committed copy: exporting epoch again
        returns it (the heap holds no local copy to read until its next checkpoint)."""
        handle = ExportHandle(self, epoch, meta, None)
        handle.state, handle.path = "done", os.path.join(self.job_dir, f"e{epoch}.h5")
        self.last = handle

    def _replace_dead_helper(self) -> None:
        """A helper that died (the OOM killer, a kill) is replaced, once per export, with a
        warning: the exports it had not finished report it; later ones go to the new helper."""
        h = self.helper
        if h is None or h.proc.poll() is None:
            return
        for f in self.finishing:   # tickets of the dead helper: each says it died
            f.settle(block=True)
            self._report(f)
        self.finishing = []
        self.helper = None
        warnings.warn(f"hpcckpt: the background export helper of rank {self.comm.Get_rank()} died (exit "
                      f"{h.proc.returncode}); starting a new one", RuntimeWarning, stacklevel=4)

    def warm_up(self) -> None:
        """Start the background helper now, so that the first export does not wait for it."""
        if self.helper is None:
            self.helper = Helper(self.mode)

    def figures(self) -> dict:
        """What the background exports cost the application so far."""
        return {"started": self.started, "skipped": self.skipped, "t_stall": self.stall, **self.parts}

    # -- the Participant protocol (hpcckpt.mpi.coordinated_checkpoint) ---------------------
    def before_prepare(self, heap: Heap, epoch: int) -> None:
        h = self.inflight
        if h is not None and h._ticket is not None and (epoch >= h.epoch + 2 or heap._info()["entries_pending"]):
            t = time.perf_counter()
            h._take_local()   # epoch E+2 overwrites the slots E's export reads; a commit wipes freed space
            self._spent("t_wait", t)

    def vote(self) -> float:
        t = time.perf_counter()
        for h in list(self.finishing):
            h.settle(block=False)
            if h.state != "finishing":
                self.finishing.remove(h)
                self._report(h)
        v = 1.0 if self.inflight is None else self.inflight.local_vote()
        self._spent("t_vote", t)
        return v

    def after_commit(self, heap: Heap, votes: np.ndarray) -> None:
        t = time.perf_counter()
        h = self.inflight
        if h is not None and (votes > 0).all():
            h.finalize(np.flatnonzero(votes == 2).tolist())
            self.inflight = None
            if h.state == "finishing" and self.comm.Get_rank() == 0:
                self.finishing.append(h)
            else:
                self._report(h)
        epoch = heap._info()["committed"]
        if self.every and epoch % self.every == 0:
            if self.inflight is None:
                self.start(heap, wait=False)
            else:
                self.skipped += 1
        self.warm_up()   # after the first checkpoint, not at open: a restore's routing has the CPUs to itself
        self._spent("t_start", t)

    def _spent(self, part: str, since: float) -> None:
        dt = time.perf_counter() - since
        self.parts[part] += dt
        self.stall += dt

    def _report(self, h: ExportHandle) -> None:
        if h.state == "failed" and self.comm.Get_rank() == 0:
            warnings.warn(f"hpcckpt: background export of epoch {h.epoch} failed: {h.error}; "
                          "LATEST still names the previous export", RuntimeWarning, stacklevel=4)

    def drain(self) -> None:
        """Collective: finish whatever is in flight (at close)."""
        if self.inflight is not None:
            try:
                self.inflight.wait()
            except ExportError as e:
                if self.comm.Get_rank() == 0:
                    warnings.warn(f"hpcckpt: {e}", RuntimeWarning, stacklevel=3)
        for h in self.finishing:
            h.settle(block=True)
            self._report(h)
        self.finishing = []
        if self.helper is not None:
            self.helper.stop()
            self.helper = None


def open_peek(path: str) -> Any:
    """A read-only handle on a heap that its owner has open (no lock, no allocator)."""
    return _native.open(path, _native.TRACK_PEEK, None, -1, -1)


__all__ = ["Exporter", "ExportHandle", "ExportError", "finish", "finish_from_sidecars", "build_manifest",
           "run_rank_request", "open_peek"]
