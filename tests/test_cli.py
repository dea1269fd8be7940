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


# -- a user's first hour: bad input gets one line and the documented exit code ---------------------
import pytest   # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st   # noqa: E402


@pytest.mark.parametrize("args", [["--count", "0"], ["--fraction", "2"], ["--fraction", "0"], ["--size", "0"],
                                  ["--trackers", "bogus"], ["--nvm-gbps", "-1"], ["--count", "x"]])
def test_bench_refuses_bad_arguments_in_one_line_with_exit_2(args):
    out = cli("bench", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("hpcckpt bench: error:"), out.stderr


def test_bench_puts_its_heaps_under_hpcckpt_root(heap_dir):
    root = os.path.join(heap_dir, "root")
    out = subprocess.run([sys.executable, "-m", "hpcckpt", "bench", "--count", "2000", "--trackers", "hash", "--json"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, HPCCKPT_ROOT=root))
    assert out.returncode == 0, out.stderr
    assert os.path.isdir(root) and os.listdir(root) == []   # used, and cleaned up


def test_info_objects_shows_sizes_and_no_stray_parentheses(heap_dir):
    with hpcckpt.Heap.create(os.path.join(heap_dir, "rank0.heap"), "4MiB") as heap:
        heap.pool("cells", "f4", 100)
        heap.array("u", (10, 10))
    out = cli("info", "--objects", heap_dir).stdout
    assert "cells: pool of 100 x float32, 400 bytes" in out and "u: array float64 (10, 10), 800 bytes" in out


def test_info_of_a_job_leads_with_its_restart_epoch_and_levels(heap_dir):
    for rank, epochs in ((0, 3), (1, 2)):                      # rank 1 died before preparing epoch 3
        heap = hpcckpt.Heap.create(os.path.join(heap_dir, f"rank{rank}.heap"), "1MiB", job="j", rank=rank,
                                   world_size=2)
        for e in range(epochs):
            heap.checkpoint(step=e)
        heap._native.abandon()
    out = cli("info", heap_dir)
    first = out.stdout.splitlines()[0]
    assert first.startswith("job 'j', 2 ranks: restarts at epoch 2 from the local heaps"), out.stdout
    assert "rank 0 at epoch 3, rank 1 at epoch 2" in first


def test_rm_removes_a_jobs_heaps_and_refuses_while_one_is_open(heap_dir):
    job = os.path.join(heap_dir, "j")
    os.mkdir(job)
    heap = hpcckpt.Heap.create(os.path.join(job, "rank0.heap"), "1MiB", job="j")
    out = cli("rm", job)
    assert out.returncode == 1 and "open in a running process" in out.stderr and os.path.exists(job)
    heap.close()
    out = cli("rm", job)
    assert out.returncode == 0 and not os.path.exists(job), out.stderr
    out = cli("rm", job)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "no heap" in out.stderr


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["info", "verify", "export", "restore", "bench", "rm", "run", "nosuch"]),
       st.lists(st.sampled_from(["--json", "--objects", "-n", "0", "-1", "x", "--to", "/nonexistent", "--",
                                 "--count", "--fraction", "2", "", "/", "--capacity", "1ZiB", "--check", "--name",
                                 "../x", "--export-dir", "70000", "--version"]), max_size=5))
def test_fuzzed_command_lines_never_print_a_traceback(command, args):
    out = subprocess.run([sys.executable, "-m", "hpcckpt", command, *args], capture_output=True, text=True,
                         timeout=120, cwd="/tmp", stdin=subprocess.DEVNULL)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode in (0, 1, 2), (out.returncode, out.stderr)


PROGRESS = """
import hpcckpt, sys
heap = hpcckpt.Heap.create(sys.argv[1], "64MiB")
heap.array("u", 1 << 22)[:] = 1.0
heap.set_nvm_model(write_gbps=0.1)           # 32 MiB at 0.1 GB/s: a checkpoint of about 0.3 s
heap.checkpoint()
heap.close()
"""


def test_a_long_checkpoint_shows_progress_on_a_terminal_and_nothing_otherwise(heap_path):
    import pty
    env = dict(os.environ, HPCCKPT_PROGRESS_AFTER="0")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", PROGRESS, heap_path], stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0
    os.close(master)
    assert b"checkpoint rank0.heap [" in out and b"100%" in out, out
    os.unlink(heap_path)
    piped = subprocess.run([sys.executable, "-c", PROGRESS, heap_path], capture_output=True, text=True, env=env,
                           timeout=120)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_a_bad_thread_count_in_the_environment_is_one_line_for_a_command_and_a_job(heap_dir):
    from mpijobs import launch

    path = os.path.join(heap_dir, "rank0.heap")
    hpcckpt.Heap.create(path, "4MiB").close()
    for value in ("x", "0", "99"):
        out = subprocess.run([sys.executable, "-m", "hpcckpt", "info", path], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "HPCCKPT_THREADS": value})
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and "HPCCKPT_THREADS" in out.stderr and "from 1 to 8" in out.stderr
    job = launch([sys.executable, "-m", "hpcckpt", "run", "-n", "2", "--max-restarts", "0", "--", sys.executable,
                  "-m", "hpcckpt.demo", "--steps", "2", "--root", heap_dir], {"HPCCKPT_THREADS": "x"})
    assert job.returncode != 0 and "HPCCKPT_THREADS='x'" in job.stderr and "Traceback" not in job.stderr, job.stderr
