"""The hpcckpt command on heaps: info and verify read, never write; a damaged heap is named."""
from __future__ import annotations

import os
import subprocess
import sys

import hpcckpt


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], capture_output=True, text=True, timeout=120)


def test_info_and_verify_describe_a_heap_directory(heap_dir):
    path = os.path.join(heap_dir, "rank0.heap")
    with hpcckpt.Heap.create(path, "4MiB", job="j") as heap:
        heap.array("u", (10, 10))[:] = 1
        heap.pool("cells", "f4", 100)
        heap.checkpoint(step=7)
    out = cli("info", "--objects", heap_dir)
    assert out.returncode == 0, out.stderr
    assert "job 'j' rank 0/1" in out.stdout and '{"step": 7}' in out.stdout and "closed cleanly" in out.stdout
    assert "cells: pool of 100 x float32" in out.stdout
    out = cli("verify", path)
    assert out.returncode == 0 and "101 committed copies verified" in out.stdout


def test_verify_names_a_flipped_checkpoint_copy(heap_dir):
    path = os.path.join(heap_dir, "rank0.heap")
    with hpcckpt.Heap.create(path, "1MiB") as heap:
        heap.array("victim", 64)[:] = 3
        heap.checkpoint()
        i = heap.info
    with open(path, "r+b") as f:
        off = i["off_data"] + i["capacity"]             # shadow A: the first copy of 'victim'
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 1]))
    out = cli("verify", path)
    assert out.returncode == 1 and "FAILED" in out.stderr and "'victim'" in out.stderr


def test_info_on_a_missing_target_says_what_to_give():
    out = cli("info", "/nonexistent/heap")
    assert out.returncode != 0 and "give a path or a job name" in out.stderr


def test_bench_prints_one_row_per_tracker():
    out = cli("bench", "--count", "2000", "--trackers", "hash,full")
    assert out.returncode == 0 and out.stdout.count("\n") == 4, out.stderr


def test_info_on_a_file_that_is_not_a_heap_is_one_line_naming_it(heap_dir):
    for content in (b"", b"garbage" * 100, os.urandom(8192)):
        path = os.path.join(heap_dir, "rank0.heap")
        with open(path, "wb") as f:
            f.write(content)
        out = cli("info", path)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.count("\n") == 1 and path in out.stderr


def test_version_is_printed():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"hpcckpt {hpcckpt.__version__}"


def test_single_process_stats_have_the_same_keys_as_under_mpi_and_int_counters(heap_path):
    with hpcckpt.Heap.create(heap_path, "4MiB") as heap:
        heap.array("u", 100)[:] = 1
        heap.checkpoint()
        s = heap.stats
        assert isinstance(s["total"]["bytes_copied"], int) and s["total"]["bytes_copied"] == 800
        assert set(s["max"]) == set(s["total"])
