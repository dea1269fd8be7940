"""Commands on a running job and what every command accepts (issue 24, items 2, 3 and 4)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

import hpcckpt
from hpcckpt.cli import COMMANDS


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def digest(directory: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def running(heap_dir):
    """A 'running' job of two ranks: both heaps held open by this process, rank 0 one epoch ahead
    (a checkpoint in flight), so a command in another process finds them locked."""
    job = os.path.join(heap_dir, "j")
    os.makedirs(job)
    heaps = [hpcckpt.Heap.create(os.path.join(job, f"rank{r}.heap"), "16MiB", job="j", rank=r, world_size=2)
             for r in range(2)]
    for h in heaps:
        h.array("u", (1000, 100))[:] = 1
        h.pool("p", "f4", 1000)
        h.checkpoint(step=7)
        h["u"][:] = 2
        h.checkpoint(step=8)
    heaps[0]["u"][:] = 3
    heaps[0].checkpoint(step=9)
    yield job, heaps
    for h in heaps:
        h.close()


def test_info_of_a_running_job_shows_its_last_committed_epoch_step_and_age_read_only(running):
    job, heaps = running
    before = digest(job)
    out = cli("info", job)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("job 'j', 2 ranks: running: last committed epoch 2, step 8, "), first
    assert " s ago" in first and "rank 0 at epoch 3, rank 1 at epoch 2" in first
    assert "running: last checkpoint epoch 3 (step 9)" in out.stdout
    rows = json.loads(cli("info", job, "--json").stdout)
    assert rows[0]["running"] and rows[1]["running"] and rows[1]["age_seconds"] >= 0
    assert digest(job) == before                 # nothing written
    heaps[1].checkpoint(step=9)                  # the job goes on: the next look sees it
    assert "last committed epoch 3, step 9" in cli("info", job).stdout


def test_info_of_a_running_job_shows_an_export_being_written(running, heap_dir):
    job, _ = running
    exports = os.path.join(heap_dir, "x")
    os.makedirs(os.path.join(exports, "j", "e4"))   # as the helpers leave it before the manifest
    out = cli("info", job, "--export-dir", exports)
    assert out.returncode == 0 and "export of epoch 4 being written" in out.stdout, out.stdout


def test_verify_of_a_running_job_checks_its_committed_copies(running):
    job, heaps = running
    out = cli("verify", job)
    assert out.returncode == 0, out.stderr
    assert "rank0.heap: ok, running, epoch 3" in out.stdout and "rank1.heap: ok, running, epoch 2" in out.stdout
    i = heaps[1].info
    with open(os.path.join(job, "rank1.heap"), "r+b") as f:   # damage both copies of 'u's first page
        for shadow in (1, 2):
            off = i["off_data"] + shadow * i["capacity"]
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 1]))
    out = cli("verify", job)
    assert out.returncode == 1 and "rank1.heap: FAILED" in out.stderr and "'u'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_export_and_rm_of_a_running_job_say_it_runs(running, heap_dir):
    job, _ = running
    out = cli("export", job, "--to", os.path.join(heap_dir, "x"))
    assert out.returncode == 1 and "the job is running" in out.stderr and "Traceback" not in out.stderr
    out = cli("rm", job)
    assert out.returncode == 1 and f"(PID {os.getpid()})" in out.stderr and len(os.listdir(job)) == 2


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_json(command):
    out = cli(command, "--help")
    assert out.returncode == 0 and "--json" in out.stdout, out.stdout


def test_json_of_every_heap_command_is_one_document(heap_dir):
    job = os.path.join(heap_dir, "j")
    os.makedirs(job)
    with hpcckpt.Heap.create(os.path.join(job, "rank0.heap"), "4MiB", job="j") as heap:
        heap.array("u", 100)[:] = 1
        heap.checkpoint(step=1)
    x, root = os.path.join(heap_dir, "x"), os.path.join(heap_dir, "r")
    for args in (["info", job], ["verify", job], ["export", job, "--to", x], ["info", os.path.join(x, "j")],
                 ["verify", os.path.join(x, "j")], ["restore", os.path.join(x, "j"), "--to", root, "-n", "1",
                                                    "--capacity", "4MiB"], ["rm", os.path.join(root, "j")],
                 ["bench", "--count", "1000", "--trackers", "hash"]):
        out = cli(*args, "--json")
        assert out.returncode == 0, (args, out.stderr)
        json.loads(out.stdout)


def test_help_lists_version_and_json():
    out = cli("--help")
    assert out.returncode == 0 and "--version" in out.stdout and "--json" in out.stdout


def test_opening_a_heap_twice_in_one_process_says_so(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB"):
        for readonly in (False, True):
            with pytest.raises(hpcckpt.HeapBusyError, match="already open in this process"):
                hpcckpt.Heap.open(heap_path, readonly=readonly)
        code = f"import hpcckpt; hpcckpt.Heap.open({heap_path!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "open in another process" in out.stderr and f"(PID {os.getpid()})" in out.stderr, out.stderr


def test_info_and_verify_of_a_job_running_under_mpiexec_with_partner_copies(heap_dir):
    """A real job on two 'nodes' (one rank each, partner copies on the other node), looked at
    while it computes: info shows the committed epoch, its step and age, and the partner
    copies; verify checks every rank's and every mirror's committed copies."""
    from hpcckpt.run import kill_tree

    root = os.path.join(heap_dir, "n{node}")
    cmd = [sys.executable, "-m", "hpcckpt", "run", "-n", "2", "--max-restarts", "0", "--", sys.executable, "-m",
           "hpcckpt.demo", "--nx", "96", "--ny", "64", "--particles", "4000", "--steps", "100000000",
           "--checkpoint-every", "5", "--capacity", "64MiB", "--root", root, "--name", "live",
           "--redundancy", "partner", "--quiet"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, HPCCKPT_NODE_OF_RANK="0,1"), start_new_session=True)
    target = os.path.join(root, "live")
    try:
        deadline, view = time.monotonic() + 120, {}
        while not (view.get("running") and "last committed epoch" in view.get("decision", "")):
            assert job.poll() is None, job.stderr.read()
            assert time.monotonic() < deadline, view
            out = cli("info", target, "--json")
            view = json.loads(out.stdout)[0] if out.returncode == 0 and out.stdout.startswith("[") else {}
        out = cli("info", target)
        first = out.stdout.splitlines()[0]
        assert out.returncode == 0 and "running: last committed epoch" in first and "step" in first, out.stdout
        assert "partner copies: rank 0 at epoch" in first and "rank 1 at epoch" in first
        out = cli("verify", target)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(": ok, running, epoch") == 4, out.stdout   # two heaps, two mirrors
        assert job.poll() is None                                           # the job never noticed
    finally:
        job.terminate()   # hpcckpt run forwards it, then removes the MPICH segments its ranks recorded
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_tree(job.pid)
            job.wait(timeout=60)
