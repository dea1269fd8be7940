"""The files of a job's directories, looked at and replaced without MPI: what a rank's heap
holds (probed read-only), which exports ``LATEST`` explains, and how an old heap makes way for
a new one without losing evidence (set aside, put back, never deleted while a process holds it).

>>> import tempfile, os
>>> probe(os.path.join(tempfile.mkdtemp(), "rank0.heap"), "job", 0, 1)
(False, None, 0, True, False)
"""
from __future__ import annotations

import builtins
import json
import os
import stat
import warnings
from typing import Any

from .errors import HeapBusyError, HeapError, OwnerMismatchError, RepairWarning
from .heap import Heap
from .locks import holder
from .manifest import complete_exports, read_latest, tidy
from .mpi import error_text


TILING_MARK = "__hpcckpt_tiling__"
FROM_EXPORT = "__hpcckpt_from_export__"   # in an epoch's meta: no local copy of epochs <= this one


def undecided(heap: Any) -> bool:
    """Was the newest epoch of this heap prepared after new declarations (its meta carries the
    mark)?  Their tiling is checked after the vote, so a job killed between the vote and the
    withdraw of a refused epoch leaves every rank prepared at it; the open takes such an epoch
    only when some rank holds a newer one (which proves it committed), else it goes back one."""
    try:
        return TILING_MARK in json.loads(heap._native.meta() or b"{}")
    except (ValueError, OSError, HeapError):
        return False


def restored_export(heap: Any) -> int | None:
    """The export epoch E this heap was restored from, while it cannot roll back to E: a restore
    from an export makes no local copy of E, and the first local epochs carry E in their meta
    (a later epoch's predecessor is local, and a rollback goes back one epoch at most)."""
    try:
        v = json.loads(heap._native.meta() or b"{}").get(FROM_EXPORT)
    except (ValueError, OSError, HeapError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def probe(path: str, name: str, rank: int, size: int) -> tuple:
    """(present, error, newest restorable epoch, clean, undecided) of this rank's heap, looked at without
    writing anything: nothing is touched until the level is chosen.  A heap is linked into
    place only once it is whole (``Heap.create``), so a file there that is not a heap is
    damage, reported like any other."""
    if not os.path.exists(path):
        return False, None, 0, True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RepairWarning)   # the writable open repairs and says so
            h = Heap.open(path, job=name, rank=rank, world_size=size, readonly=True)
        info = h._info()
        clean = info["was_clean"] and info["good_epoch"] == info["prepared"]   # a close sealed it: decided
        unsure = not clean and info["good_epoch"] == info["prepared"] and undecided(h)
        h._native.abandon()
    except (OSError, HeapError, ValueError) as e:
        return True, error_text(e), 0, True, False
    if info["good_epoch"] < 0:
        return True, f"CorruptHeapError: {info['damage']}", 0, True, False
    good = info["good_epoch"]
    return True, None, good, info["was_clean"] and good == info["prepared"], unsure


def fs_type(path: str) -> str:
    """The file system type of the mount that holds `path`, from /proc/self/mountinfo."""
    best, kind, path = "", "unknown", os.path.realpath(path)
    try:
        with builtins.open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].replace("\\040", " ")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, kind = point, right.split()[0]
    except (OSError, IndexError):
        pass
    return kind


def exports_here(job_dir: str, mode: int = 0o600) -> tuple[list[int], str | None]:
    """(complete exports, newest first, after removing half-written ones; None) or ([], the
    reason the exports here cannot be trusted)."""
    own_export_dir(job_dir, mode)
    latest, marker = read_latest(job_dir), os.path.join(job_dir, "LATEST")
    manifests = sorted((int(f[1:-5]) for f in os.listdir(job_dir)
                        if f.startswith("e") and f.endswith(".json") and f[1:-5].isdigit()), reverse=True)
    if latest is None and os.path.exists(marker):
        return [], f"{marker} is damaged (not a JSON object with a positive integer epoch)" + \
            (f" and exports of epoch(s) {manifests} are there" if manifests else "")
    if latest is None:
        if manifests:
            return [], f"{job_dir} holds exports of epoch(s) {manifests} but no LATEST marker: they may be incomplete"
        return [], None
    if latest not in manifests:
        return [], (f"{marker} names epoch {latest}, whose manifest e{latest}.json is not there"
                    + (f" (the exports there are of epoch(s) {manifests})" if manifests else ""))
    tidy(job_dir, keep=1 << 30)
    return complete_exports(job_dir), None


def own_export_dir(job_dir: str, mode: int = 0o600) -> None:
    """Create a job's export directory (search bits added to `mode`) if needed, and refuse one
    that another user could have filled or could change: owned by another user, writable by
    every user, or a symbolic link in a directory others can write."""
    me, parent = os.getuid(), os.path.dirname(job_dir)
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(job_dir, mode | (mode & 0o444) >> 2)
    except FileExistsError:
        pass
    link, shared = os.lstat(job_dir), os.stat(parent).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if stat.S_ISLNK(link.st_mode) and (shared or link.st_uid != me):
        raise HeapError(f"{job_dir}: the export directory is a symbolic link in a directory others can write; "
                        "refusing to follow it")
    st = os.stat(job_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise HeapError(f"{job_dir}: exists and is not a directory; choose another export_dir or job name")
    if st.st_uid != me:
        raise OwnerMismatchError(f"{job_dir}: the exports belong to uid {st.st_uid}, not to you, and are not trusted; "
                                 "choose an export_dir of your own")
    if st.st_mode & stat.S_IWOTH:
        raise HeapError(f"{job_dir}: the export directory is writable by every user "
                        f"(mode {stat.S_IMODE(st.st_mode):o}); chmod o-w it")


def set_aside(path: str) -> str | None:
    """Move this rank's old heap to ``<path>.aside`` while a restore from an export builds a new
    one: it is removed once every rank has filled its new heap, and put back if no export can be
    restored."""
    if not os.path.exists(path):
        return None
    refuse_if_held(path)
    os.rename(path, path + ".aside")
    return path + ".aside"


def finish_killed_opens(path: str) -> None:
    """Finish what a killed open left: a heap a killed ``Heap.create`` left under its temporary
    name (``rank<r>.heap.new<pid>``: never linked into place, it never held committed state) is
    removed; a heap set aside by a restore from an export is put back, unless the new heap
    committed (then it is the one to keep)."""
    directory, base = os.path.split(path)
    if os.path.exists(path + ".aside"):
        if os.path.exists(path) and probe(path, None, None, None)[2] == 0 and holder(path) is None:
            os.unlink(path)   # the restore died before its heap committed anything
        if os.path.exists(path):
            os.unlink(path + ".aside")
        else:
            os.rename(path + ".aside", path)
    for entry in os.listdir(directory):
        if entry.startswith(base + ".new") and entry[len(base) + 4:].isdigit():
            leftover = os.path.join(directory, entry)
            if holder(leftover) is None and not _alive(int(entry[len(base) + 4:])):
                os.unlink(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refuse_if_held(path: str) -> None:
    """Raise HeapBusyError when a live process holds the heap at `path` (a job of the same
    name started meanwhile): nothing of it may be replaced or moved."""
    pid = holder(path)
    if pid is not None:
        raise HeapBusyError(f"{path} is held by process {pid or '(another namespace)'}: a job of the same name "
                            "is running; nothing was replaced")


def unlink_heap(path: str) -> None:
    """Remove this rank's old heap file before a new heap takes its place, never a held one."""
    refuse_if_held(path)
    if os.path.exists(path):
        os.unlink(path)


__all__ = ["own_export_dir", "TILING_MARK", "FROM_EXPORT", "restored_export", "undecided", "probe", "fs_type", "exports_here", "set_aside", "finish_killed_opens",
           "unlink_heap"]
