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

from .errors import HeapError
from .heap import Heap, Pool
from .partner import MirrorHeap, catalog
from ._cli_export import find_export, info_export, verify_export
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


def describe(path: str, objects: bool) -> dict:
    """What `hpcckpt info` shows of one heap, read-only."""
    with open_readonly(path) as heap:
        i = heap.info
        out = {"path": path, "job": i["job"], "rank": i["rank"], "world_size": i["world_size"],
               "format": f"{i['major']}.{i['minor']}", "capacity": i["capacity"],
               "used_bytes": i["pages_used"] * i["page_size"],
               "objects": len(catalog(heap)) if isinstance(heap, MirrorHeap) else len(heap),
               "epoch": i["prepared"] or None, "meta": heap.meta if i["prepared"] else {},
               "state": "closed cleanly" if i["was_clean"] else
                        f"not closed cleanly: the next open restores epoch {i['prepared'] or 'none (empty)'}",
               "dax": i["dax"], "restorable": i["good_epoch"] if i["good_epoch"] >= 0 else None,
               "copy": "partner" if os.path.basename(path).startswith("partner-") else "local"}
        if objects:
            out["objects_list"] = []
            for name in heap:
                obj, d = heap[name], heap.describe(name)
                kind = f"pool of {len(obj)} x {obj.dtype}{f' {obj.shape}' if obj.shape else ''}" \
                    if isinstance(obj, Pool) else f"array {obj.dtype} {obj.shape}"
                out["objects_list"].append(f"{name}: {kind}, {d['obj_size'] * d['count']} bytes")
        return out


def job_view(rows: list[dict], export_dir: str | None) -> dict:
    """The job's restart decision, as hpcckpt.open would take it: which epoch, from which level."""
    job, size = rows[0]["job"], rows[0]["world_size"]
    epochs = {r["rank"]: r["restorable"] for r in rows if r["copy"] == "local"}
    kept = {r["rank"]: (r["restorable"], r["epoch"]) for r in rows if r["copy"] == "partner"}
    missing = [r for r in range(size) if r not in epochs]
    damaged = [r for r, e in epochs.items() if e is None]
    lost = sorted(missing + damaged)
    newest = None
    if export_dir:
        where = find_export(os.path.join(export_dir, job))
        newest = info_export(*where)[0]["epoch"] if where else None
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
        decision = f"restarts at epoch {newest} from the export"
    else:
        why = f"rank(s) {missing} have no heap" if missing else f"rank(s) {damaged} are damaged"
        decision = (f"cannot restart from local heaps: {why}" + (", nor from partner copies" if kept else "") +
                    "; give --export-dir if it has exports")
    levels = ", ".join(f"rank {r} at {e}" for r, e in sorted(epochs.items()))
    partners = f"; partner copies: {', '.join(f'rank {r} at {e[0]}' for r, e in sorted(kept.items()))}" if kept else ""
    exports = f"; newest export: epoch {newest}" if export_dir else ""
    return {"job": job, "world_size": size, "local_epochs": epochs, "partner_epochs": {r: e[0] for r, e in kept.items()},
            "export_epoch": newest, "decision": decision,
            "summary": f"job {job!r}, {size} ranks: {decision} (local heaps: {levels}{partners}{exports})"}


def info(argv: list[str]) -> int:
    """Print what each heap holds: owner, epoch, meta, state, objects."""
    ap = argparse.ArgumentParser(prog="hpcckpt info", description="show heaps (read-only)")
    ap.add_argument("targets", nargs="+", help="heap file, directory of rank*.heap, or job name")
    ap.add_argument("--objects", action="store_true", help="list the objects with their sizes")
    ap.add_argument("--export-dir", metavar="DIR", help="the job's export directory, to show that level too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows, exports, jobs = [], [], []
    for t in args.targets:
        where = find_export(t)
        if where:
            exports += info_export(*where)
        else:
            found = [describe(p, args.objects) for p in heap_files(t)]
            rows += found
    for job in dict.fromkeys(r["job"] for r in rows):   # one view per job, over every directory given
        mine = [r for r in rows if r["job"] == job]
        if len(mine) > 1 or mine[0]["world_size"] > 1:
            jobs.append(job_view(mine, args.export_dir))
    if args.json:
        print(json.dumps(jobs + rows + exports, indent=1))
        return 0
    for j in jobs:
        print(j["summary"])
    for e in exports:
        print(f"{e['path']}: export of job {e['job']!r}, epoch {e['epoch']} {json.dumps(e['meta'])}, "
              f"{e['world_size']} ranks{', LATEST' if e['latest'] else ''}, {len(e['objects'])} objects")
        if args.objects:
            for name, o in e["objects"].items():
                print(f"    {name}: {o['layout']} {o['kind']} {o['dtype']} {o['shape']}, {o['bytes']} bytes")
    for r in rows:
        whose = f"partner copy of rank {r['rank']}/{r['world_size']}" if r["copy"] == "partner" else \
            f"rank {r['rank']}/{r['world_size']}"
        print(f"{r['path']}: job {r['job']!r} {whose}, format {r['format']}, "
              f"{r['objects']} objects, {r['used_bytes'] / 2**20:.1f} of {r['capacity'] / 2**20:.0f} MiB used, "
              f"epoch {r['epoch']} {json.dumps(r['meta'])}, {r['state']}")
        for line in r.get("objects_list", []):
            print("   ", line)
    return 0


def verify(argv: list[str]) -> int:
    """Check the checksum of every committed copy; exit 1 naming the first bad heap and object."""
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
        with open_readonly(path) as heap:
            n, epoch = heap.verify(), heap.info["prepared"] or None
        return {"epoch": epoch, "copies": n}, f"epoch {epoch}, {n} committed copies verified"

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


def rm(argv: list[str]) -> int:
    """Remove a job's heaps (its directory under the root), refusing while a process has one open."""
    import fcntl
    ap = argparse.ArgumentParser(prog="hpcckpt rm", description="remove a job's heaps")
    ap.add_argument("job", help="job name (under $HPCCKPT_ROOT or the default root) or its directory")
    args = ap.parse_args(argv)
    files = heap_files(args.job)
    directory = os.path.dirname(files[0])
    for path in files:   # the heap's own lock: a running rank holds it exclusively
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HeapError(f"{path}: open in a running process; stop the job first") from None
    for path in files:
        os.unlink(path)
    if not os.listdir(directory):
        os.rmdir(directory)
    print(f"removed {len(files)} heap(s) of {directory}")
    return 0
