"""``hpcckpt info | verify | bench``: look at heaps without changing them, and measure trackers.

>>> info(["/no/such/heap"])   # doctest: +SKIP
hpcckpt info: /no/such/heap: no heap file or directory of heaps; give a path or a job name
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from .errors import HeapBusyError, HeapError
from .heap import Heap, Pool
from .table import Table
from .locks import holder
from .partner import MirrorHeap, catalog
from ._cli_export import find_export, info_export, verify_export
from ._cli_live import age_text, describe_live, epoch_record, export_state, verify_live
from .mpi import default_root


def heap_files(target: str) -> list[str]:
    """A heap file, a directory of rank*.heap (and partner-rank*.heap copies), or a job name under
    the default root; ``{node}`` in the target stands for every node's directory."""
    def number(p: str) -> tuple:
        base = os.path.basename(p)
        return base.startswith("partner-"), int("".join(c for c in base if c.isdigit()) or 0), p
    for cand in (target, os.path.join(default_root(), target)):
        found = []
        for c in sorted(glob.glob(cand.replace("{node}", "*"))) if "{node}" in cand else [cand]:
            if os.path.isfile(c):
                found.append(c)
            elif os.path.isdir(c):
                found += glob.glob(os.path.join(c, "rank*.heap")) + glob.glob(os.path.join(c, "partner-rank*.heap"))
        if found:
            return sorted(found, key=number)
    raise SystemExit(f"hpcckpt: {target}: no heap file or directory of heaps; give a path or a job name")


def open_readonly(path: str) -> Heap:
    """A heap file as it lies on media; a partner copy (its working data unused) as a MirrorHeap."""
    kind = MirrorHeap if os.path.basename(path).startswith("partner-") else Heap
    return kind.open(path, readonly=True)


def at(epoch: int | None) -> str:
    """How every command words a heap's epoch: 'epoch 3', 'empty' (nothing committed), 'damaged'."""
    return "damaged" if epoch is None else f"epoch {epoch}" if epoch else "empty"


def describe(path: str, objects: bool) -> dict:
    """What `hpcckpt info` shows of one heap, read-only; a heap a running process holds is
    peeked at without its lock (``hpcckpt._cli_live``)."""
    try:
        heap = open_readonly(path)
    except HeapBusyError:
        return describe_live(path)
    with heap:
        i = heap.info
        epoch, good = i["prepared"] or None, i["good_epoch"] if i["good_epoch"] >= 0 else None
        rec = epoch_record(path, epoch) if epoch else None
        out = {"path": path, "job": i["job"], "rank": i["rank"], "world_size": i["world_size"],
               "format": f"{i['major']}.{i['minor']}", "capacity": i["capacity"],
               "used_bytes": i["pages_used"] * i["page_size"],
               "objects": len(catalog(heap)) if isinstance(heap, MirrorHeap) else len(heap),
               "epoch": epoch, "meta": heap.meta if epoch else {}, "running": False,
               "age_seconds": time.time() - rec["time"] if rec else None,
               "state": "closed cleanly" if i["was_clean"] else
                        f"not closed cleanly: the next open restores {at(good)}",
               "dax": i["dax"], "restorable": good,
               "copy": "partner" if os.path.basename(path).startswith("partner-") else "local"}
        if objects:
            out["objects_list"] = []
            for name in heap:
                obj, d = heap[name], heap.describe(name)
                if isinstance(obj, Pool):
                    kind = f"pool of {len(obj)} x {obj.dtype}{f' {obj.shape}' if obj.shape else ''}"
                elif isinstance(obj, Table):
                    kind = (f"table of {len(obj)} x {obj.dtype} (room for {obj.capacity})"
                            f"{', distributed' if obj.distributed else ''}")
                else:
                    kind = f"array {obj.dtype} {obj.shape}"
                out["objects_list"].append(f"{name}: {kind}, {d['obj_size'] * d['count']} bytes")
        return out


def export_level(export_dir: str, job: str, check: bool) -> dict:
    """The export a restart would use: the newest complete one whose files are all there (and,
    with `check`, whose every CRC matches); the ones passed over and why."""
    state = export_state(os.path.join(export_dir, job))
    passed = []
    for e in state["complete"]:
        try:
            s = info_export(state["dir"], e, check)[0]
        except HeapError as err:
            passed.append({"epoch": e, "why": str(err)})
            continue
        if s["problem"]:
            passed.append({"epoch": e, "why": s["problem"]})
            continue
        return {**state, "epoch": e, "verified": s["verified"], "passed_over": passed}
    return {**state, "epoch": None, "verified": False, "passed_over": passed}


def running_decision(rows: list[dict], missing: list[int], lost: list[int]) -> str:
    """A running job's line: the epoch every rank has committed (the oldest newest epoch over
    the ranks: a rank ahead may be in the middle of the next checkpoint), its step and age."""
    if missing:
        return f"running (rank(s) {missing} not among the heaps given: give the job's directory)"
    mine = [r for r in rows if r["copy"] == "local" and r["restorable"] is not None]
    last = min(mine, key=lambda r: r["restorable"] or 0) if mine and not lost else None
    if not (last and last["restorable"]):
        return "running: no epoch committed by every rank yet"
    step = f", step {last['meta']['step']}" if "step" in last["meta"] else ""
    age = f", {age_text(last['age_seconds'])} ago" if last["age_seconds"] is not None else ""
    return f"running: last committed epoch {last['restorable']}{step}{age}"


def job_view(rows: list[dict], export_dir: str | None, check: bool = False) -> dict:
    """The job's restart decision, as hpcckpt.open would take it: which epoch, from which level;
    for a running job, its last committed epoch, step and age."""
    job, size = rows[0]["job"], rows[0]["world_size"]
    epochs = {r["rank"]: r["restorable"] for r in rows if r["copy"] == "local"}
    kept = {r["rank"]: (r["restorable"], r["epoch"]) for r in rows if r["copy"] == "partner"}
    missing = [r for r in range(size) if r not in epochs]
    damaged = [r for r, e in epochs.items() if e is None]
    lost = sorted(missing + damaged)
    level = export_level(export_dir, job, check) if export_dir else None
    newest = level["epoch"] if level else None
    local = None if lost else min(epochs.values())
    rebuilt = None
    if lost and len(lost) < size and all(kept.get(r, (None,))[0] for r in lost):
        e = min([v for v in epochs.values() if v] + [kept[r][0] for r in lost])
        if all(e >= (kept[r][1] or 0) - 1 for r in lost):
            rebuilt = e
    if local is not None and (newest is None or local >= newest):
        decision = f"restarts at epoch {local} from the local heaps" if local else "starts afresh (nothing committed)"
    elif rebuilt and (newest is None or rebuilt >= newest):
        decision = f"restarts at epoch {rebuilt}, rebuilding rank(s) {lost} from their partner copies"
    elif newest is not None:
        decision = (f"restarts at epoch {newest} from the export" +
                    (" (its checksums verified)" if level["verified"] else
                     " (unverified: --check reads its checksums)"))
    else:
        why = f"rank(s) {missing} have no heap" if missing else f"rank(s) {damaged} are damaged"
        decision = (f"cannot restart from local heaps: {why}" + (", nor from partner copies" if kept else "") +
                    ("; no usable export either" if export_dir else "; give --export-dir if it has exports"))
    running = any(r.get("running") for r in rows)
    if running:   # a live job: what it has committed so far, not what a restart would do
        decision = running_decision(rows, missing, lost)
    levels = ", ".join(f"rank {r} at {at(e)}" for r, e in sorted(epochs.items()))
    partners = f"; partner copies: {', '.join(f'rank {r} at {at(e[0])}' for r, e in sorted(kept.items()))}" \
        if kept else ""
    exports = ""
    if level:
        exports = f"; newest usable export: {at(newest) if newest else 'none'}"
        exports += (" (verified)" if level["verified"] else " (unverified)") if newest else ""
        exports += "".join(f" (epoch {p['epoch']} passed over: {p['why']})" for p in level["passed_over"])
        exports += "".join(f"; export of epoch {e} being written" for e in level["in_progress"])
    return {"job": job, "world_size": size, "running": running, "local_epochs": epochs,
            "partner_epochs": {r: e[0] for r, e in kept.items()}, "export_epoch": newest,
            "export_verified": level["verified"] if level else None, "decision": decision,
            "passed_over": level["passed_over"] if level else [],
            "summary": f"job {job!r}, {size} ranks: {decision} (local heaps: {levels}{partners}{exports})"}


def info(argv: list[str]) -> int:
    """Print what each heap or export holds: owner, epoch, meta, state, objects; exit 1 when an
    export is incomplete or (with --check) damaged.

    >>> info(["demo", "--export-dir", "/scratch/exports", "--check"])   # doctest: +SKIP
    job 'demo', 4 ranks: restarts at epoch 12 from the local heaps (local heaps: rank 0 at epoch 12, ...)
    """
    ap = argparse.ArgumentParser(prog="hpcckpt info", description="show heaps and exports (read-only)")
    ap.add_argument("targets", nargs="+", help="heap file, directory of rank*.heap, job name, export directory or "
                                               "master e<E>.h5")
    ap.add_argument("--objects", action="store_true", help="list the objects with their sizes")
    ap.add_argument("--export-dir", metavar="DIR", help="the job's export directory, to show that level too")
    ap.add_argument("--check", action="store_true", help="read every block of the exports shown and check its CRC "
                                                         "(else exports are reported unverified)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows, exports, jobs = [], [], []
    for t in args.targets:
        where = find_export(t)
        if where:
            exports += info_export(*where, check=args.check, quiet=args.json)
        else:
            rows += [describe(p, args.objects) for p in heap_files(t)]
    for job in dict.fromkeys(r["job"] for r in rows):   # one view per job, over every directory given
        mine = [r for r in rows if r["job"] == job]
        if len(mine) > 1 or mine[0]["world_size"] > 1 or args.export_dir or mine[0].get("running"):
            jobs.append(job_view(mine, args.export_dir, args.check))
    bad = [e for e in exports if e["problem"]]
    bad += [{"path": os.path.join(args.export_dir, j["job"], f"e{p['epoch']}.h5"), "problem": p["why"]}
            for j in jobs for p in j["passed_over"]]
    if args.json:
        print(json.dumps(jobs + rows + exports, indent=1))
        return 1 if bad else 0
    for j in jobs:
        print(j["summary"])
    for e in exports:
        state = f"PROBLEM: {e['problem']}" if e["problem"] else "verified" if e["verified"] else \
            "unverified (--check reads every block)"
        print(f"{e['path']}: export of job {e['job']!r}, epoch {e['epoch']} {json.dumps(e['meta'])}, "
              f"{e['world_size']} ranks{', LATEST' if e['latest'] else ''}, {len(e['objects'])} objects, {state}")
        if args.objects:
            for name, o in e["objects"].items():
                print(f"    {name}: {o['layout']} {o['kind']} {o['dtype']} {o['shape']}, {o['bytes']} bytes")
    for r in rows:
        whose = f"partner copy of rank {r['rank']}/{r['world_size']}" if r["copy"] == "partner" else \
            f"rank {r['rank']}/{r['world_size']}"
        used = f"{r['used_bytes'] / 2**20:.1f} of {r['capacity'] / 2**20:.0f} MiB used" \
            if r["used_bytes"] is not None else f"capacity {r['capacity'] / 2**20:.0f} MiB"
        print(f"{r['path']}: job {r['job']!r} {whose}, format {r['format']}, {r['objects']} objects, {used}, "
              f"{at(r['epoch'] or 0)} {json.dumps(r['meta'])}, {r['state']}")
        for line in r.get("objects_list", []):
            print("   ", line)
    for e in bad:
        print(f"hpcckpt info: {e['path']}: {e['problem']}", file=sys.stderr)
    return 1 if bad else 0


def verify(argv: list[str]) -> int:
    """Check the checksum of every committed copy; exit 1 naming the first bad heap and object.
    A running job's heaps are checked too, through a read-only mapping without their lock.

    >>> verify(["demo"])   # doctest: +SKIP
    /dev/shm/hpcckpt-me/demo/rank0.heap: ok, epoch 12, 40 committed copies verified
    """
    ap = argparse.ArgumentParser(prog="hpcckpt verify", description="check checkpoint checksums (read-only)")
    ap.add_argument("targets", nargs="+", help="heap file, directory of heaps, job name, export directory or master")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = []

    def check(path: str, run) -> None:
        """One target: run() returns its figures and the line to print, or raises naming the damage."""
        try:
            figures, line = run()
            report.append({"path": path, "ok": True, **figures})
            if not args.json:
                print(f"{path}: ok, {line}")
        except (HeapError, OSError) as e:
            report.append({"path": path, "ok": False, "error": str(e)})
            print(f"{path}: FAILED: {e}", file=sys.stderr)

    def verify_heap(path: str):
        try:
            heap = open_readonly(path)
        except HeapBusyError:   # a running job's heap: its committed copies, read without the lock
            return verify_live(path)
        with heap:
            n, epoch = heap.verify(), heap.info["prepared"] or None
        return {"epoch": epoch, "copies": n}, f"{at(epoch or 0)}, {n} committed copies verified"

    def verify_one_export(where):
        r = verify_export(*where, quiet=args.json)
        return r, f"epoch {r['epoch']}, {r['blocks']} blocks ({r['bytes']} bytes) verified"

    for t in args.targets:
        where = find_export(t)
        if where:
            check(t, lambda: verify_one_export(where))
        else:
            for path in heap_files(t):
                check(path, lambda: verify_heap(path))
    bad = sum(not r["ok"] for r in report)
    if args.json:
        print(json.dumps(report, indent=1))
    return 1 if bad else 0


def bench(argv: list[str]) -> int:
    """Checkpoint cost and bytes copied per tracker for one pool size and dirty fraction."""
    from .bench import available_trackers, measure_trackers
    ap = argparse.ArgumentParser(prog="hpcckpt bench", description="checkpoint cost per tracker")
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--nvm-gbps", type=float, default=0.0, help="model NVM write bandwidth (0: off)")
    ap.add_argument("--trackers", default=",".join(available_trackers()))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    trackers = args.trackers.split(",")
    if args.count < 1 or not 1 <= args.size <= 1 << 20:
        ap.error(f"need --count >= 1 and 1 <= --size <= {1 << 20} (got {args.count}, {args.size})")
    if not 0 < args.fraction <= 1 or args.nvm_gbps < 0:
        ap.error(f"need 0 < --fraction <= 1 and --nvm-gbps >= 0 (got {args.fraction}, {args.nvm_gbps})")
    unknown = [t for t in trackers if t not in available_trackers()]
    if unknown:
        ap.error(f"--trackers {','.join(unknown)}: not a tracker this kernel runs; choose from "
                 f"{','.join(available_trackers())}")
    rows = measure_trackers(args.count, args.size, args.fraction, trackers, args.nvm_gbps)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{args.count} objects of {args.size} B, {args.fraction:.1%} rewritten"
          + (f", NVM model {args.nvm_gbps} GB/s" if args.nvm_gbps else ""))
    print(f"{'tracker':>9} {'ckpt ms':>9} {'copied MB':>10} {'page-grained MB':>16}")
    for r in rows:
        print(f"{r['tracker']:>9} {r['t_checkpoint'] * 1e3:9.2f} {r['bytes_copied'] / 1e6:10.3f} "
              f"{r['bytes_page_baseline'] / 1e6:16.3f}")
    return 0


HEAP_MAGIC = b"HHPCCKPT"   # the superblock's first 8 bytes, at page 0 and in its twin at page 5


def is_heap_file(fd: int) -> bool:
    """Does the open file carry a heap's magic in its superblock or the superblock's twin?
    (The core's own test: a heap with one damaged superblock is still a heap.)"""
    return any(os.pread(fd, 8, off) == HEAP_MAGIC for off in (0, 5 * 4096))


def rm(argv: list[str]) -> int:
    """Remove a job's heaps (its directory under the root), refusing while a process has one open.

    Every file is locked (the lock a running rank holds) and checked to be a heap before
    anything is removed, and stays locked while it is unlinked: a job starting meanwhile
    finds its heap busy rather than losing it. A file that is not a heap is never removed.

    >>> rm(["demo"])   # doctest: +SKIP
    removed 4 heap(s) of /dev/shm/hpcckpt-me/demo
    """
    import fcntl
    ap = argparse.ArgumentParser(prog="hpcckpt rm", description="remove a job's heaps (refused while it runs)")
    ap.add_argument("job", help="job name (under $HPCCKPT_ROOT or the default root), its directory, or a heap file")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    files = heap_files(args.job)
    directories = [] if os.path.isfile(args.job) else list(dict.fromkeys(os.path.dirname(f) for f in files))
    held: list[int] = []
    try:
        for path in files:
            if os.path.islink(path):
                raise HeapError(f"{path}: a symbolic link, not a heap; nothing was removed")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = holder(path)
                raise HeapBusyError(f"{path}: open in a running process{f' (PID {pid})' if pid else ''}; stop the "
                                    "job first (nothing was removed)") from None
            if not is_heap_file(fd):
                raise HeapError(f"{path}: not an hpcckpt heap (no heap magic in page 0 or its twin); nothing was "
                                "removed: remove it by hand if it is yours to delete")
        for path in files:   # still locked: nobody opens them between the check and the unlink
            os.unlink(path)
    finally:
        for fd in held:
            os.close(fd)
    for d in directories:   # a job's directory goes with its last heap; a file's directory stays
        if not os.listdir(d):
            os.rmdir(d)
    where = ", ".join(directories) or args.job
    print(json.dumps({"removed": files, "directories": directories}) if args.json
          else f"removed {len(files)} heap(s) of {where}")
    return 0
