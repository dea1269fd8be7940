"""Shared fixtures: every heap lives in a fresh directory under /dev/shm that is removed afterwards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import hpcckpt

KERNEL_TRACKERS = ["uffd", "mprotect"] if hpcckpt.resolve_tracker("auto") == "uffd" else ["mprotect"]
ALL_TRACKERS = KERNEL_TRACKERS + ["page", "hash", "full"]


def debian_tool(command: str, packages: str) -> str:
    """The path of `command`, installing Debian `packages` the way CI installs them if it is
    missing; skips the test only where nothing can be installed (not root, no apt-get)."""
    path = shutil.which(command)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {packages}",
                       shell=True, check=True, capture_output=True, timeout=900)
        path = shutil.which(command)
    if path is None:
        pytest.skip(f"{command} is not installed and cannot be installed here (apt-get install {packages})")
    return path


@pytest.fixture
def heap_dir():
    """A private directory on tmpfs for heaps; removed with everything in it."""
    d = tempfile.mkdtemp(prefix="hpcckpt-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def heap_path(heap_dir):
    return os.path.join(heap_dir, "rank0.heap")


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a child interpreter (killed by PID on timeout); returns the finished process."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
