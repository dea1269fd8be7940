"""The background export helper: one process per rank, spawned by hpcckpt.export.Helper.

It reads JSON requests on stdin and answers each with one JSON line on stdout:
``rank`` writes a rank file from the committed copies of a heap that its owner has open
(through a read-only, unlocked mapping of the heap file); ``finish`` writes the master,
the manifest and LATEST from the blocks every rank left beside its file.  It exits when stdin closes, and
when its parent process ends.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time


_busy = threading.Lock()   # held while a request is served


def _die_with_parent() -> None:
    """End when the owning process does, once the request in hand is served (a master being
    written is finished: the rank files it names are durable already).  Not PR_SET_PDEATHSIG:
    it fires when the *thread* that started the helper ends (a thread that called hpcckpt.open
    and returned), while the process lives on and exports.  Stdin's end is not enough either:
    a child the owner forked may hold the pipe open.  So a daemon thread watches the parent's PID."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _busy.acquire(timeout=600)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="hpcckpt-parent-watch").start()


def main() -> int:
    _die_with_parent()
    os.umask(int(os.environ.get("HPCCKPT_EXPORT_UMASK", "63")))   # files 0600, directories 0700 unless asked
    os.nice(19)   # yield to the ranks: waking up must not preempt the compute it works beside
    import h5py  # noqa: F401  (imported before the first request, while the job computes)

    from .export import KEEP, finish_from_sidecars, open_peek, run_rank_request
    from .manifest import tidy

    handles: dict[str, object] = {}
    for line in sys.stdin:
        prune = None
        with _busy:
            try:
                req = json.loads(line)
                if req["op"] == "rank":
                    h = handles.get(req["heap"]) or handles.setdefault(req["heap"], open_peek(req["heap"]))
                    reply = {"ok": True, "blocks": run_rank_request(req, h.read_epoch)}
                else:
                    master = finish_from_sidecars(req["job_dir"], req["job"], req["epoch"], req["world_size"],
                                                  req["meta"], prune=False)
                    reply, prune = {"ok": True, "master": master}, req["job_dir"]
            except Exception as e:   # noqa: BLE001 -- every failure goes back to the owner as a reply
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        try:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        except OSError:   # the owner has gone: what it asked for is done, nobody reads the reply
            return 0
        if prune:   # after the reply: nobody waits for old exports to be freed
            try:
                tidy(prune, keep=KEEP, running=True)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
