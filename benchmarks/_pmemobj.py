"""Baseline: PMDK ``pmemobj_alloc`` cost per object, via a small C harness.

The harness (``pmemobj_alloc.c`` beside this file) is compiled on the fly
against the system's libpmemobj (Debian: ``libpmemobj-dev``). Nothing is
installed here: when the header or library is absent the measurement is
skipped (``None`` plus a one-line reason on stderr).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS_SRC = Path(__file__).with_name("pmemobj_alloc.c")
PMEMOBJ_HEADER = Path("/usr/include/libpmemobj.h")
_TIMEOUT_S = 55  # whole call stays under 60 s


def _skip(reason: str) -> None:
    print(f"pmemobj_alloc baseline skipped: {reason}", file=sys.stderr)


def pmemobj_alloc_ns(
    count: int = 1_000_000,
    size: int = 256,
    workdir: str | None = None,
    force_pmem: bool = True,
) -> dict | None:
    """Time ``count`` calls of ``pmemobj_alloc(pop, &oid, size, 0, NULL, NULL)``.

    Compiles the harness with ``cc -O2 ... -lpmemobj -lpmem`` into a temp dir
    and runs it on a fresh pool file created in ``workdir`` (default: a temp
    dir under /dev/shm, else the system temp dir). With ``force_pmem`` the
    harness runs with ``PMEM_IS_PMEM_FORCE=1`` (flush-based persistence as on
    real pmem); without it libpmem falls back to ``msync``. The binary, the
    temp dirs and the pool file are removed in every case.

    Returns the harness's JSON line as a dict, e.g.::

        >>> r = pmemobj_alloc_ns(count=100_000)      # doctest: +SKIP
        >>> r
        {'allocator': 'pmemobj_alloc', 'count': 100000, 'size': 256,
         'ns_per_alloc': 1712.3, 'pmem_is_pmem': 1}

    or ``None`` (with a one-line reason on stderr) when libpmemobj's header
    is missing, compilation fails, or the run fails / times out.
    """
    if count <= 0 or size <= 0:
        raise ValueError("count and size must be positive")
    if not PMEMOBJ_HEADER.exists():
        _skip(f"{PMEMOBJ_HEADER} not found (install libpmemobj-dev)")
        return None
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _skip("no C compiler (cc) on PATH")
        return None

    build_dir = tempfile.mkdtemp(prefix="hpcckpt-pmemobj-build-")
    pool_dir = None
    pool_path = None
    try:
        exe = os.path.join(build_dir, "pmemobj_alloc")
        try:
            comp = subprocess.run(
                [cc, "-O2", "-o", exe, str(HARNESS_SRC), "-lpmemobj", "-lpmem"],
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            _skip(f"compiling the harness failed: {e}")
            return None
        if comp.returncode != 0:
            first = (comp.stderr.strip().splitlines() or ["(no output)"])[0]
            _skip(f"compiling the harness failed: {first}")
            return None

        if workdir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            pool_dir = tempfile.mkdtemp(prefix="hpcckpt-pmemobj-", dir=base)
            pool_path = os.path.join(pool_dir, "bench.pool")
        else:
            fd, pool_path = tempfile.mkstemp(
                prefix="hpcckpt-pmemobj-", suffix=".pool", dir=workdir
            )
            os.close(fd)
            os.unlink(pool_path)  # pmemobj_create wants a non-existent file

        env = dict(os.environ)
        env.pop("PMEM_IS_PMEM_FORCE", None)
        if force_pmem:
            env["PMEM_IS_PMEM_FORCE"] = "1"
        try:
            run = subprocess.run(
                [exe, pool_path, str(count), str(size)],
                capture_output=True,
                text=True,
                env=env,
                timeout=_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            _skip(f"running the harness failed: {e}")
            return None
        if run.returncode != 0:
            msg = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
            _skip(f"harness failed: {msg}")
            return None
        try:
            return json.loads(run.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError) as e:
            _skip(f"unparseable harness output {run.stdout!r}: {e}")
            return None
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
        if pool_path is not None:
            try:
                os.unlink(pool_path)
            except FileNotFoundError:
                pass
        if pool_dir is not None:
            shutil.rmtree(pool_dir, ignore_errors=True)


if __name__ == "__main__":
    for force in (True, False):
        print(json.dumps(pmemobj_alloc_ns(force_pmem=force)))
