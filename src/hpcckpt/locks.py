"""Who holds a heap: a heap open in a process carries an ``flock`` on its file (exclusive for
a writer, shared for a read-only look), which ends with that process.

One job name, one running job: before a job creates, restores, deletes or exports anything,
it looks for heaps of its name that a live process holds.

>>> import tempfile, os
>>> d = tempfile.mkdtemp(); open(os.path.join(d, "rank0.heap"), "w").close()
>>> held_heaps(d)
[]
"""
from __future__ import annotations

import os


def holder(path: str) -> int | None:
    """The PID of a live process holding an flock on `path` (0 if its PID cannot be seen, as
    from another PID namespace), or None when none does.  Reads ``/proc/locks`` only: taking a
    lock to find out would make concurrent lookers see each other."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:   # a waiter, not a holder
                    continue
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    return int(parts[4]) if parts[4].isdigit() else 0
    except OSError:
        pass
    return None


def held_heaps(directory: str) -> list[tuple[str, int]]:
    """(path, PID) of every heap file in `directory` (``*.heap``) that a live process holds."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if name.endswith(".heap"):
            path = os.path.join(directory, name)
            pid = holder(path)
            if pid is not None:
                found.append((path, pid))
    return found


def refuse_if_running(directory: str, job: str) -> None:
    """Raise HeapBusyError, naming the job, a file and its holder, when a live process holds a
    heap of this job's directory."""
    from .errors import HeapBusyError
    held = held_heaps(directory)
    if held:
        path, pid = held[0]
        who = f"process {pid}" if pid else "a process of another namespace"
        more = f" (and {len(held) - 1} more heap(s))" if len(held) > 1 else ""
        raise HeapBusyError(f"job {job!r} is running: {path} is held by {who}{more}; one job name runs once at a "
                            "time. Wait for it to end, stop it, or choose another job name")


__all__ = ["holder", "held_heaps", "refuse_if_running"]
