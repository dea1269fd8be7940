"""The background export helper: one process per rank, spawned by hpcckpt.export.Helper.

It reads JSON requests on stdin and answers each with one JSON line on stdout:
``rank`` writes a rank file from the committed copies of a heap that its owner has open
(through a read-only, unlocked mapping of the heap file); ``finish`` writes the master,
the manifest and LATEST.  It exits when stdin closes, and dies with its parent.
"""
from __future__ import annotations

import ctypes
import json
import signal
import sys


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    _die_with_parent()
    import h5py  # noqa: F401  (imported before the first request, while the job computes)

    from .export import finish, open_peek, run_rank_request
    from .manifest import Manifest

    handles: dict[str, object] = {}
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["op"] == "rank":
                h = handles.get(req["heap"]) or handles.setdefault(req["heap"], open_peek(req["heap"]))
                reply = {"ok": True, "blocks": run_rank_request(req, h.read_epoch)}
            else:
                m = Manifest.from_json(req["manifest"], "manifest")
                reply = {"ok": True, "master": finish(req["job_dir"], m)}
        except Exception as e:   # noqa: BLE001 -- every failure goes back to the owner as a reply
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
