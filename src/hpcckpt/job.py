"""A job's heap: the collective open that chooses the restart level, and the heap an MPI
program uses (coordinated checkpoints, exports).

Restart takes the cheapest level every rank can restore at a common epoch:
``local`` (every rank's heap is there, of this rank count, at an epoch at least as new
as the newest export), else ``partner`` (the heaps a lost node took with it, rebuilt from
their partners' copies), else ``export`` (the newest complete export that every rank can
read, on any number of ranks), else a fresh start if nothing was ever committed.  Evidence
of committed state that none of these can use stops the open with an error; it is never
met by a fresh start or a deletion (``fresh=True`` starts afresh on purpose).

>>> from mpi4py import MPI                                                  # doctest: +SKIP
>>> heap = hpcckpt.open("heat", MPI.COMM_WORLD, export_dir="ckpt", export_every=5)  # doctest: +SKIP
>>> heap.restored_from, heap.epoch, heap.meta                                # doctest: +SKIP
('export', 40, {'step': 400})
"""
from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import time
import warnings
from typing import Any

from . import deadline
from .errors import HeapError
from .export import Exporter, ExportHandle
from .heap import Heap, _call, _check_name, crash_hook, default_threads, locked
from .jobfiles import (FROM_EXPORT, TILING_MARK, exports_here, finish_killed_opens, fs_type, probe, restored_export,
                       set_aside, unlink_heap)
from .locks import refuse_if_running
from .manifest import ExportError, load_manifest
from .mpi import (agree, coordinated_checkpoint, default_root, error_class, error_text, first_error, private_dir,
                  reduce_max)
from .partner import PartnerLevel, nodes_of_ranks, restorable
from .restore import fill_from_export


class JobHeap(Heap):
    """One rank's heap inside an MPI job: ``checkpoint`` and ``export`` are collective."""

    comm: Any = None
    job = ""
    exporter: Exporter | None = None
    partner: PartnerLevel | None = None
    _layout_dirty = True
    # Restored from the export of epoch _export_epoch, no local checkpoint yet: its metadata,
    # and the reader whose files a block declared again is read from.
    _export_epoch = 0
    _export_meta: dict | None = None
    _export_reader: Any = None

    def _save_layouts(self) -> None:
        super()._save_layouts()
        self._layout_dirty = True

    def _from_export(self) -> bool:
        """Is the committed epoch still the export this heap was restored from (no local copy)?"""
        return self._export_meta is not None and self._info()["committed"] == self._export_epoch

    def _forget_export(self) -> None:
        self._export_meta, self._reblock = None, None
        if self._export_reader is not None:
            self._export_reader.close()
            self._export_reader = None

    @locked
    def checkpoint(self, **meta: Any) -> int:
        """Collective: commit one global epoch holding every object as it is now.

        Distributed objects declared since the last checkpoint are checked to tile their
        global shapes; every K-th epoch is exported when the heap was opened with export_every=K.
        """
        dirty = self._layout_dirty
        if dirty:   # its tiling is checked after the vote: see undecided
            meta = {**meta, TILING_MARK: 1}
        if self._from_export():   # this epoch cannot be rolled back to a local copy: see restored_export
            meta = {**meta, FROM_EXPORT: self._export_epoch}
        blob = json.dumps(meta, sort_keys=True).encode()
        parts = [self.exporter] if self.exporter else []
        try:
            epoch = coordinated_checkpoint(self, self.comm, blob, parts, layout_changed=dirty, partner=self.partner)
        finally:
            if not self._from_export():   # it committed (or a later step of it failed): the export is behind
                self._forget_export()
        self._layout_dirty = False
        if self.exporter is not None:
            self._stats["export"] = self.exporter.figures()
        return epoch

    @property
    def meta(self) -> dict:
        """The metadata saved with the last committed epoch ({} before the first)."""
        if self._from_export():
            return dict(self._export_meta or {})
        return {k: v for k, v in super().meta.items() if k not in (TILING_MARK, FROM_EXPORT)}

    def verify(self) -> int:
        """As :meth:`Heap.verify`; 0 right after a restore from an export, which left no local
        epoch to check (the export's CRCs were checked as it was read)."""
        return 0 if self._from_export() else super().verify()

    @locked
    def export(self, wait: bool = True) -> ExportHandle:
        """Collective: export the last committed epoch to HDF5 under ``export_dir/<job>/``.

        With ``wait=False`` the rank files are written in the background; the returned handle's
        ``wait()`` (collective) says when the export is durable.
        """
        if self.exporter is None:
            raise HeapError("this heap has no export directory; open it with hpcckpt.open(..., export_dir=DIR)")
        return self.exporter.start(self, wait)

    @locked
    def close(self) -> None:
        """Finish an export in flight (collective then), make the heap durable and mark it clean."""
        if self.exporter is not None and os.getpid() == self._pid:
            self.exporter.drain()
        if self._from_export() and os.getpid() == self._pid:
            # restored from an export and closed before any checkpoint: the close's local epoch
            # keeps the export's metadata (a plain close would save none)
            _call(self._native.prepare, json.dumps({**self._export_meta, FROM_EXPORT: self._export_epoch},
                                                   sort_keys=True).encode())
            _call(self._native.commit)
        if os.getpid() == self._pid:
            self._forget_export()
        super().close()
        if self.partner is not None and os.getpid() == self._pid:
            self.partner.close()


def check_job_name(name: str) -> None:
    """A job name is one path component: no '/', not '.' or '..', at most 63 bytes."""
    _check_name(name)
    if name in (".", ".."):
        raise ValueError(f"job name {name!r} is not a directory name; choose a plain name")


def open(name: str, comm: Any = None, root: str | None = None, capacity: int | str = "1GiB",
         tracker: str = "auto", max_objects: int | None = None, preallocate: bool = False,
         export_dir: str | None = None, export_every: int = 0, redundancy: str = "none",
         timeout: float | None = None, abort_on_error: bool = True, fresh: bool = False,
         export_mode: int = 0o600) -> JobHeap:
    """Open or create this rank's heap `<root>/<name>/rank<r>.heap`, collectively.

    Restores the last epoch every rank can reach: from the local heaps if all are there at
    a common epoch; else, with ``redundancy="partner"``, by rebuilding the heaps a lost node
    took with it from the copies its partner ranks keep; else (with `export_dir`) from the
    newest complete export, on any number of ranks.  ``heap.restored_from`` says ``"local"``,
    ``"partner"``, ``"export"`` or None (fresh), and ``heap.epoch`` and ``heap.meta`` say where
    to resume.  `export_every=K` exports every K-th committed epoch in the background.  A
    `root` containing ``{node}`` gets each node's number there (one directory per node).
    Exports are private to you (files 0600, directories 0700) unless `export_mode` (e.g.
    ``0o640``) says otherwise; an export directory of another user is not trusted.

    A job whose heaps a live process holds (the same job name, running) is refused before
    anything is created, restored or deleted.  Every collective of hpcckpt waits at most
    `timeout` seconds (default ``$HPCCKPT_TIMEOUT``, else 600; 0: no deadline), then aborts the
    job saying what it waited for.  With `abort_on_error` (the default) an uncaught exception on
    any rank prints its traceback and ends the whole job with ``MPI_Abort``, so that no rank
    waits forever for one that died; ``abort_on_error=False`` leaves ``sys.excepthook`` alone.

    Committed state that cannot be used (a ``LATEST`` that names no export, exports without a
    readable ``LATEST``, local heaps that cannot be read) stops the open with an error naming
    the files and the choices; nothing is deleted.  ``fresh=True`` starts afresh on purpose,
    replacing this job's heaps (exports are left where they are).
    """
    deadline.record_segments()   # first: a rank refused below still leaves its MPICH segment known
    if abort_on_error:
        deadline.install_abort_hook()
    if timeout is not None:
        deadline.set_timeout(timeout)
    deadline.timeout()   # a bad $HPCCKPT_TIMEOUT is refused on every rank alike, before MPI is touched
    check_job_name(name)
    if type(export_mode) is not int or not 0o600 <= export_mode <= 0o777 or export_mode & 0o600 != 0o600:
        raise ValueError(f"export_mode={export_mode!r}: give a file mode with read and write for you, e.g. 0o600 "
                         "(private, the default) or 0o640 (readable by your group)")
    if redundancy not in ("none", "partner"):
        raise ValueError(f"redundancy must be 'none' or 'partner', got {redundancy!r}")
    default_threads()   # a bad $HPCCKPT_THREADS is refused on every rank alike, before MPI is touched
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    deadline.record_segments()
    root = root or default_root()
    nodes = None
    if redundancy == "partner" or "{node}" in root:
        nodes = nodes_of_ranks(comm)
        root = root.replace("{node}", str(nodes[rank]))
    directory = os.path.join(root, name)
    path = os.path.join(directory, f"rank{rank}.heap")
    err = None
    try:
        private_dir(directory)
        refuse_if_running(directory, name)
        finish_killed_opens(path)
    except (OSError, HeapError) as e:
        err = error_text(e)
    agree(comm, err)
    deadline.enable_census(comm)
    partner = None
    if redundancy == "partner" and len(set(nodes)) < 2:
        if rank == 0:
            warnings.warn(f"hpcckpt: job {name!r} runs on one node: the partner level is off (a copy on the same "
                          "node would not survive losing it)", RuntimeWarning, stacklevel=2)
    elif redundancy == "partner":
        partner = PartnerLevel(comm, nodes, directory, name, capacity)
    exporter = Exporter(comm, name, export_dir, export_every, export_mode) if export_dir else None
    opts = dict(capacity=capacity, tracker=tracker, max_objects=max_objects, preallocate=preallocate)
    if fresh:   # on purpose: no level is looked at, this job's heaps are replaced
        exports, problem = [], None
        moved = _move_exports_aside(comm, exporter) if exporter is not None else None
        if rank == 0:
            warnings.warn(f"hpcckpt: job {name!r} starts afresh (fresh=True); its old heaps are replaced"
                          + (f", its old exports moved to {moved}" if moved else ""), RuntimeWarning, stacklevel=2)
    else:
        exports, problem = _list_exports(comm, exporter)
    if problem and rank == 0:
        warnings.warn(f"hpcckpt: {problem}; the exports are not used, and nothing is deleted", RuntimeWarning,
                      stacklevel=2)

    mine = probe(path, name, rank, size) if not fresh else (False, None, 0, True, False)
    if partner is not None:
        rebuilt = _partner_level(comm, partner, mine, exports, path, name, opts)
        if rebuilt is not None:
            return _ready(rebuilt, comm, name, exporter, partner)
    present, err, good, clean, _ = mine
    blocking = bool(present and err)   # a file there that cannot be read is evidence, never "nothing yet"
    v = reduce_max(comm, [not present, err is not None, -good, good, not clean, blocking, mine[4]])
    view = {"absent": bool(v[0]), "broken": bool(v[1]), "common": int(-v[2]), "newest": int(v[3]),
            "unclean": bool(v[4])}   # the whole job in one fixed-size reduction; names only on failure
    if view["common"] == view["newest"] > 0 and v[6]:   # its tiling check may have refused it (undecided)
        view["common"], view["unclean"] = view["common"] - 1, True
    if view["newest"] == 0 and not v[5]:   # nothing was ever committed anywhere: start afresh
        view = {"absent": True, "broken": False, "common": 0, "newest": 0, "unclean": False}
    common = view["common"]
    local_ok = not view["absent"] and not view["broken"]
    heap = None
    if local_ok and (not exports or common >= exports[0]):
        try:
            heap = JobHeap._attach(path, tracker, name, rank, size)
        except (OSError, HeapError, ValueError) as e:
            err = error_text(e)
        agree(comm, err)
    try:
        use_export = bool(exports)
        if heap is not None:
            if _restore_local(heap, comm, view, exports):
                heap.restored_from = "local" if heap._info()["committed"] else None   # clean reopen included
                heap._layout_dirty = not heap._info()["committed"]   # a committed epoch's tiling was checked
                return _ready(heap, comm, name, exporter, partner)
        elif not exports and (view["broken"] or view["newest"]):
            states = deadline.allgather(comm, mine, "the ranks' agreement at open")
            missing = [r for r, s in enumerate(states) if not s[0]]
            broken = [(r, s[1]) for r, s in enumerate(states) if s[1]]
            why = (f"rank {broken[0][0]} cannot open its heap: {broken[0][1]}" if broken else
                   f"rank(s) {missing} have no heap while the others do")
            cls = error_class([e for _, e in broken]) if broken else HeapError
            raise cls(f"{directory}: {why}; the job cannot restart from local heaps (nothing was "
                      f"overwritten) and no export is given (export_dir=). Restore it from an export, remove "
                      f"{directory} (hpcckpt rm), or start afresh on purpose with hpcckpt.open(..., fresh=True).")
        if use_export:   # local heaps missing, damaged, older than the export, or of another rank count
            if heap is not None:
                heap._native.abandon()
                heap = None
            return _ready(_restore_export(comm, name, path, exports, exporter, opts), comm, name, exporter, partner)
    except BaseException:
        if heap is not None:
            heap._native.abandon()
        raise
    # a fresh start
    if heap is not None:
        heap._native.abandon()
    if problem:
        raise ExportError(f"{problem}, and no local heap of job {name!r} can be restored, so the job cannot "
                          f"restart. Nothing was deleted. Choose: point LATEST at a complete export (`hpcckpt info "
                          f"{exporter.job_dir}` lists them), remove {exporter.job_dir} to give up its exports, or "
                          "start afresh on purpose with hpcckpt.open(..., fresh=True)")
    err, heap = None, None
    try:
        unlink_heap(path)
        heap = JobHeap.create(path, capacity, tracker=tracker, max_objects=max_objects, job=name, rank=rank,
                              world_size=size, preallocate=preallocate)
    except (OSError, HeapError, ValueError) as e:
        err = error_text(e)
    try:
        agree(comm, err)
    except BaseException:
        if heap is not None:   # a refused open leaves no empty heap behind
            heap._native.abandon()
            os.unlink(path)
        raise
    _remove_stale(comm, directory, size)
    return _ready(heap, comm, name, exporter, partner)


def _partner_level(comm, partner: PartnerLevel, mine: tuple, exports: list[int], path: str, name: str,
                   opts: dict) -> JobHeap | None:
    """Rebuild the heaps of ranks that lost them (a node gone, its directory empty) from the
    copies their partners keep, and bring the others back locally to the same epoch: the
    newest every surviving rank can restore.  None when no rank lost its heap, or when an
    export is newer or must be used; an error naming the ranks and levels when nothing can help."""
    rank, size = comm.Get_rank(), comm.Get_size()
    states = deadline.allgather(comm, (mine[0], mine[1] is not None, mine[2], mine[3], partner.probes()),
                                "the ranks' agreement on the partner level at open")
    newest = max(s[2] for s in states)
    lost = [r for r, s in enumerate(states) if not s[0] or s[1] or (s[2] == 0 and newest > 0)]
    if not lost or newest == 0:
        return None
    alive = [r for r in range(size) if r not in lost]
    holder = partner.partners
    kept = {r: states[holder[r]][4].get(r, (False, 0, 0)) if holder[r] not in lost else (False, 0, 0) for r in lost}
    # a lost rank's mirror prepared an epoch only after that rank did, and before the vote: the
    # newest epoch every survivor and every mirror holds is the newest that can have committed
    epoch = min([states[r][2] for r in alive] + [k[1] for k in kept.values() if k[0]], default=0)
    missing = [r for r in lost if not restorable(kept[r], epoch)]
    if missing or not alive or (exports and epoch < exports[0]):
        if exports:
            return None
        raise HeapError(f"{os.path.dirname(path)}: rank(s) {lost} lost their heaps (local level) and the partner "
                        f"copies of rank(s) {missing or lost} are missing or not at epoch {epoch} (partner level); no "
                        "export is given (export_dir=): the job cannot restart. Remove the job's directories to "
                        "start afresh.")
    err, heap = None, None
    try:
        for w in partner.wards:
            if w in lost:
                partner.serve(w, epoch)
        if rank in lost:
            got = partner.receive()
            unlink_heap(path)
            heap = JobHeap.create(path, opts["capacity"], tracker=opts["tracker"], max_objects=opts["max_objects"],
                                  job=name, rank=rank, world_size=size, preallocate=opts["preallocate"])
            hook = crash_hook(rank)
            if hook and hook[0] == "mid-rebuild":   # the test hook: die with the heap created, not filled
                os.kill(os.getpid(), signal.SIGKILL)
            partner.fill(heap, *got, epoch)
        else:
            heap = JobHeap._attach(path, opts["tracker"], name, rank, size)
            info = heap._info()
            why = _no_local_copy(heap, epoch)
            if why:
                raise HeapError(why)
            if not (info["was_clean"] and info["committed"] == epoch == info["good_epoch"] == info["prepared"]):
                heap._recover(epoch)
    except Exception as e:   # any failure is a vote: no rank leaves the others waiting
        err = error_text(e)
    failed = first_error(comm, err, "the rebuild from partner copies")
    if failed:
        if heap is not None:
            heap._native.abandon()
        if exports:
            if rank == 0:
                warnings.warn(f"hpcckpt: rebuilding from partner copies failed ({failed}); restoring from the "
                              "export", RuntimeWarning, stacklevel=3)
            return None
        raise HeapError(f"rank(s) {lost} lost their heaps and rebuilding them from partner copies failed: {failed}; "
                        "no export is given (export_dir=)")
    heap.restored, heap.restored_from, heap._layout_dirty = True, "partner", False
    return heap


def _ready(heap: JobHeap, comm, name: str, exporter: Exporter | None, partner: PartnerLevel | None = None) -> JobHeap:
    heap.comm, heap.job, heap.exporter, heap.partner = comm, name, exporter, partner
    heap.set_threads(default_threads(_ranks_on_my_node(comm)))
    if partner is not None:
        partner.settle(heap._info()["committed"])
    if comm.Get_rank() == 0:
        _say_where(heap, name)
        kind = fs_type(os.path.dirname(heap.path))
        if kind not in ("tmpfs", "ramfs") and not heap.info["dax"]:
            warnings.warn(f"hpcckpt: the heaps of job {name!r} are on {kind} ({os.path.dirname(heap.path)}), not "
                          "tmpfs or DAX persistent memory: checkpoints and restores run at that file system's "
                          "speed (README \"Where the heap lives\"); set HPCCKPT_ROOT to a node-local tmpfs",
                          RuntimeWarning, stacklevel=3)
    return heap


def _ranks_on_my_node(comm) -> int:
    """How many ranks of `comm` share this rank's node (its shared-memory group)."""
    from mpi4py import MPI
    deadline.arrive(comm, "the grouping of ranks by node at open")
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    n = shared.Get_size()
    shared.Free()
    return n


def _say_where(heap: JobHeap, name: str) -> None:
    """Rank 0, once per open: where the job resumes; under ``hpcckpt run`` also a line in the
    relauncher's status file (an attempt that never gets here died before opening its heaps)."""
    where = (f"resumes job {name!r} at epoch {heap.epoch}" + (f" (step {heap.meta['step']})" if "step" in heap.meta
             else "") + f" from the {heap.restored_from} level") if heap.restored_from else f"starts job {name!r} afresh"
    status, attempt = os.environ.get("HPCCKPT_RUN_STATUS"), os.environ.get("HPCCKPT_ATTEMPT")
    if attempt:
        print(f"hpcckpt: attempt {attempt} {where}", file=sys.stderr, flush=True)
    if status:
        try:
            with builtins.open(status, "a") as f:
                f.write(where + "\n")
        except OSError:
            pass


def _list_exports(comm, exporter: Exporter | None) -> tuple[list[int], str | None]:
    """Rank 0 removes half-written exports and lists the complete ones, newest first; with a
    problem instead (the same on every rank) when exports are there that LATEST does not
    explain: then nothing is listed or removed."""
    if exporter is None:
        return [], None
    found, problem, err = [], None, None
    if comm.Get_rank() == 0:
        try:
            found, problem = exports_here(exporter.job_dir, exporter.mode)
        except OSError as e:
            err = f"{exporter.job_dir}: {e.strerror}"
        except Exception as e:   # rank 0 tells the others whatever happened, never dies before it
            err = f"{exporter.job_dir}: {error_text(e)}"
    found, problem, err = deadline.bcast(comm, (found, problem, err), "the list of exports at open (from rank 0)")
    if err:
        raise HeapError(f"export directory {err}")
    return found, problem


def _move_exports_aside(comm, exporter: Exporter) -> str | None:
    """A fresh start keeps the old exports, out of the way (their LATEST would name epochs the
    new run reaches later): rank 0 renames ``<dir>/<job>`` to ``<dir>/<job>.before-fresh-<time>``."""
    moved, err = None, None
    if comm.Get_rank() == 0 and os.path.isdir(exporter.job_dir) and os.listdir(exporter.job_dir):
        moved = f"{exporter.job_dir}.before-fresh-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.rename(exporter.job_dir, moved)
        except OSError as e:
            err = f"{exporter.job_dir}: cannot move the old exports aside: {e.strerror}"
    moved, err = deadline.bcast(comm, (moved, err), "the fresh start's move of old exports (from rank 0)")
    if err:
        raise HeapError(err)
    return moved


def _restore_local(heap: JobHeap, comm, view: dict, exports: list[int]) -> bool:
    """Bring every rank to the common epoch; False if some rank failed and an export can help."""
    epoch = view["common"]
    if not view["unclean"] and view["common"] == view["newest"]:
        return True   # every rank closed cleanly at the same epoch: keep the working state
    err = _no_local_copy(heap, epoch)
    try:
        if err is None:
            heap._recover(epoch)
    except (OSError, HeapError) as e:
        err = error_text(e)
    if exports:
        failed = first_error(comm, err)
        if failed:
            if comm.Get_rank() == 0:
                warnings.warn(f"hpcckpt: local restore failed ({failed}); restoring from the export",
                              RuntimeWarning, stacklevel=3)
            return False
        return True
    agree(comm, err)
    return True


def _no_local_copy(heap: JobHeap, epoch: int) -> str | None:
    """Why `heap` cannot be brought back to `epoch` locally: it was restored from the export of
    that epoch and its first local epoch has not committed everywhere (None: it may)."""
    since = restored_export(heap)
    if since is None or epoch > since:
        return None
    return (f"{heap.path} holds no local copy of epoch {epoch}: it was restored from the export of epoch {since} "
            "(export_dir= gives the export)")


def _restore_export(comm, name: str, path: str, exports: list[int], exporter: Exporter, opts: dict) -> JobHeap:
    """Fresh heaps filled from the newest export every rank can read; older ones on failure."""
    rank, size = comm.Get_rank(), comm.Get_size()
    reasons, aside = [], None
    for epoch in exports:
        heap, err, reader = None, None, None
        try:
            m = load_manifest(exporter.job_dir, epoch)
            if m.job != name:
                raise ExportError(f"{exporter.job_dir}: export of epoch {epoch} belongs to job {m.job!r}")
            if aside is None:
                aside = set_aside(path)
            unlink_heap(path)   # only a heap this open created for an export that failed
            heap = JobHeap.create(path, opts["capacity"], tracker=opts["tracker"], max_objects=opts["max_objects"],
                                  job=name, rank=rank, world_size=size, preallocate=opts["preallocate"])
            reader = fill_from_export(heap, exporter.job_dir, m, rank, size)
            heap._native.rebase(epoch)   # the export is epoch's committed copy: no local one is made
        except Exception as e:   # bad input of any kind makes this export unusable on every rank alike
            err = str(e) if isinstance(e, ExportError) else error_text(e)
        first = first_error(comm, err, f"the restore of the export of epoch {epoch}")
        if first:
            if reader is not None:
                reader.close()
            if heap is not None:
                heap._native.abandon()
            reasons.append(f"epoch {epoch}: {first}")
            if rank == 0:
                warnings.warn(f"hpcckpt: export of epoch {epoch} is unusable: {first}", RuntimeWarning,
                              stacklevel=3)
            continue
        heap.comm = comm
        # Every rank holds epoch's data now; the first checkpoint copies all of it (the objects
        # are new). The default split tiles by construction: only a block declared again (which
        # marks the layout dirty) has its tiling checked then.
        heap._export_meta = {k: v for k, v in m.meta.items() if k not in (TILING_MARK, FROM_EXPORT)}
        heap._export_epoch, heap._export_reader, heap._layout_dirty = epoch, reader, False
        heap.restored, heap.restored_from = True, "export"
        exporter.adopt(epoch, heap._export_meta)
        if aside:
            os.unlink(aside)
        _remove_stale(comm, os.path.dirname(path), size)
        return heap
    unlink_heap(path)
    if aside:
        os.rename(aside, path)   # the local heap as it was: nothing is lost by a failed restore
    raise ExportError(f"{exporter.job_dir}: no export can be restored ({'; '.join(reasons)}); "
                      "the local heaps are gone or out of step, so the job cannot restart")


def _remove_stale(comm, directory: str, size: int) -> None:
    """Rank 0 removes heaps of ranks beyond the job's size (left by a larger run)."""
    deadline.arrive(comm, "the end of the open")
    if comm.Get_rank() == 0:
        for entry in os.listdir(directory):
            if entry.startswith("rank") and entry.endswith(".heap") and entry[4:-5].isdigit() and \
                    int(entry[4:-5]) >= size:
                os.unlink(os.path.join(directory, entry))


__all__ = ["open", "JobHeap", "check_job_name"]
