"""Never hang: one rank's error ends the job, every collective of hpcckpt has a deadline, a
second job of the same name is refused, and a seeded campaign of faults ends every run with
the failure-free answer or a clear error.  Under the real mpiexec, each job in its own
process group, killed by PID on timeout (a hang fails the test, it does not stall CI)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
from mpijobs import launch

from hpcckpt.run import kill_tree

pytestmark = pytest.mark.timeout(600)

# A small application: a counter per rank and a block of a global array, a checkpoint every
# 2 steps, FAULT="kind:rank:step" on the first attempt only (raise, kill, skip a checkpoint).
APP = """
import os, signal, sys, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD; r, n = comm.rank, comm.size
root, steps = sys.argv[1], int(sys.argv[2])
heap = hpcckpt.open("app", comm, root=root, capacity="16MiB", export_dir=os.environ.get("EXPORTS") or None,
                    fresh=bool(os.environ.get("FRESH")))
if os.environ.get("VOTE_TIMEOUT"):   # short deadlines for the checkpoints only: the open may meet slow imports
    hpcckpt.deadline.set_timeout(float(os.environ["VOTE_TIMEOUT"]))
u = heap.array("u", (8,), "f8", global_shape=(8 * n,), offset=(8 * r,))
start = heap.meta["step"] if heap.epoch is not None else 0
if start == 0:
    u[:] = r
kind, where, when = (os.environ.get("FAULT", "none:0:0").split(":") + ["0", "0"])[:3]
first = os.environ.get("HPCCKPT_ATTEMPT", "1") == "1"
for step in range(start + 1, steps + 1):
    u += step * (1 + r)
    hit = first and r == int(where) and step == int(when)
    if hit and kind == "raise":
        open(os.path.join(root, "raised"), "w").write(repr(MPI.Wtime()))
        raise ValueError(f"a declaration that did not fit, on rank {r}")
    if hit and kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if step % 2 == 0 and not (hit and kind == "skip"):
        heap.checkpoint(step=step)
    if hit and kind == "skip":
        comm.Barrier()           # the rank goes on to the application's own collective
total = np.zeros(1); comm.Allreduce(np.array([u.sum()]), total)
if r == 0:
    print("answer:", total[0], flush=True)
heap.close()
"""


def run_app(root: str, n: int, steps: int = 8, fault: str = "none:0:0", restarts: int = 0,
            env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    app = os.path.join(root, "app.py")
    with open(app, "w") as f:
        f.write(textwrap.dedent(APP))
    cmd = [sys.executable, "-m", "hpcckpt", "run", "-n", str(n), "--max-restarts", str(restarts), "--",
           sys.executable, app, os.path.join(root, "heaps"), str(steps)]
    return launch(cmd, {"FAULT": fault, **(env or {})}, timeout=timeout)


def answer(proc: subprocess.CompletedProcess) -> str | None:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("answer:")]
    return lines[-1] if lines else None


def expected(n: int, steps: int = 8) -> str:
    return f"answer: {sum(8 * (r + sum(s * (1 + r) for s in range(1, steps + 1))) for r in range(n)):.1f}"


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "inf", "1e999", ""])
def test_a_bad_timeout_is_refused_in_one_line_naming_the_variable(text):
    from hpcckpt.deadline import DEFAULT_TIMEOUT, parse_timeout
    if text == "":
        assert parse_timeout(text) == DEFAULT_TIMEOUT
        return
    with pytest.raises(ValueError, match=r"HPCCKPT_TIMEOUT=.*: give the seconds .* \(0 turns the deadline off\)"):
        parse_timeout(text)


@pytest.mark.parametrize("mode", [0o400, 0o1777, -1, "640", 0o200])
def test_a_bad_export_mode_is_refused_before_mpi_is_touched(mode):
    import hpcckpt
    with pytest.raises(ValueError, match="export_mode=.*give a file mode with read and write for you"):
        hpcckpt.open("j", export_mode=mode, abort_on_error=False)

@pytest.mark.parametrize("n", [2, 4])
def test_an_exception_on_one_rank_ends_the_job_with_its_traceback_then_mpi_abort(heap_dir, n):
    t0 = time.monotonic()
    proc = run_app(heap_dir, n, fault=f"raise:{n - 1}:3")
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert "ValueError: a declaration that did not fit" in proc.stderr
    assert proc.stderr.index("Traceback") < proc.stderr.index("ended by ValueError; aborting the job (MPI_Abort)")
    assert "waited" not in proc.stderr and took < 240      # ended by the abort, not by any deadline


@pytest.mark.parametrize("n", [2, 3])
def test_a_checkpoint_skipped_on_one_rank_aborts_at_the_deadline_naming_the_vote(heap_dir, n):
    proc = run_app(heap_dir, n, fault="skip:0:4", env={"VOTE_TIMEOUT": "5"})
    assert proc.returncode != 0
    assert "waited 5 s for the vote of checkpoint 2 (heap.checkpoint)" in proc.stderr, proc.stderr[-2000:]
    assert "rank(s) [0] never arrived" in proc.stderr and "HPCCKPT_TIMEOUT" in proc.stderr


@pytest.mark.parametrize("n", [2, 4])
def test_the_job_resumes_with_the_failure_free_answer_after_an_exception_relaunch(heap_dir, n):
    proc = run_app(heap_dir, n, fault=f"raise:{n // 2}:5", restarts=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert answer(proc) == expected(n)
    assert "attempt 2 resumes job 'app' at epoch 2 (step 4)" in proc.stderr


def test_a_second_job_of_the_same_name_is_refused_while_the_first_runs(heap_dir):
    first_app = textwrap.dedent(f"""
        import os, sys, time, numpy as np, hpcckpt
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        heap = hpcckpt.open("same", comm, root={heap_dir!r}, capacity="16MiB")
        u = heap.array("u", (4,), "f8"); u[:] = comm.rank + 1
        heap.checkpoint(step=1)
        open(os.path.join({heap_dir!r}, f"open{{comm.rank}}"), "w").close()
        go = os.path.join({heap_dir!r}, "go")
        for _ in range(6000):             # until the test says go (bounded: at most 60 s)
            if os.path.exists(go):
                break
            time.sleep(0.01)
        u += 10; heap.checkpoint(step=2)
        print("first:", comm.allreduce(float(u.sum())), flush=True)
        heap.close()
    """)
    proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, "-c", first_app], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        limit = time.monotonic() + 120
        while not all(os.path.exists(os.path.join(heap_dir, f"open{r}")) for r in range(2)):
            assert proc.poll() is None and time.monotonic() < limit, "the first job did not open its heaps"
            time.sleep(0.05)
        second = launch(["mpiexec", "-n", "2", sys.executable, "-c", textwrap.dedent(f"""
            import hpcckpt
            from mpi4py import MPI
            hpcckpt.open("same", MPI.COMM_WORLD, root={heap_dir!r}, capacity="16MiB")
        """)], timeout=120)
        assert second.returncode != 0
        assert "job 'same' is running" in second.stderr and "is held by process" in second.stderr
        open(os.path.join(heap_dir, "go"), "w").close()
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert proc.returncode == 0, err
    assert "first: 92.0" in out            # (1+10)*4 + (2+10)*4: the first job's heaps were never touched
    assert sorted(os.listdir(os.path.join(heap_dir, "same"))) == ["rank0.heap", "rank1.heap"]


BAD_LATEST = ['{"epoch": 1e999}', '{"epoch": -3}', '{"epoch": 0}', '{"epoch": "2"}', '{"epoch": true}', "[]",
              '{"epoch": 99999999999999999999999}', "\x00\x01"]


@pytest.mark.parametrize("text", BAD_LATEST)
def test_a_bad_latest_is_one_clear_error_on_every_rank(heap_dir, text):
    exports = os.path.join(heap_dir, "exports")
    done = run_app(heap_dir, 2, env={"EXPORTS": exports})
    assert done.returncode == 0, done.stderr[-2000:]
    launch([sys.executable, "-m", "hpcckpt", "export", os.path.join(heap_dir, "heaps", "app"), "--to", exports])
    with open(os.path.join(exports, "app", "LATEST"), "w") as f:
        f.write(text)
    for entry in os.listdir(os.path.join(heap_dir, "heaps", "app")):   # the local level is gone: the export must serve
        os.unlink(os.path.join(heap_dir, "heaps", "app", entry))
    before = sorted(os.listdir(os.path.join(exports, "app")))
    proc = run_app(heap_dir, 2, env={"EXPORTS": exports})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "LATEST" in proc.stderr and "fresh=True" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(exports, "app"))) == before      # nothing deleted
    assert "waited" not in proc.stderr


def test_a_manifest_with_zero_chunk_rows_falls_back_to_the_previous_export_on_every_rank(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert run_app(heap_dir, 2, steps=4, env={"EXPORTS": exports}).returncode == 0
    job = os.path.join(heap_dir, "heaps", "app")
    assert launch([sys.executable, "-m", "hpcckpt", "export", job, "--to", exports]).returncode == 0
    assert run_app(heap_dir, 2, steps=8, env={"EXPORTS": exports}).returncode == 0
    assert launch([sys.executable, "-m", "hpcckpt", "export", job, "--to", exports]).returncode == 0
    latest = json.load(open(os.path.join(exports, "app", "LATEST")))["epoch"]
    path = os.path.join(exports, "app", f"e{latest}.json")
    m = json.load(open(path))
    for obj in m["objects"].values():
        for b in obj["blocks"]:
            b["chunk_rows"] = 0
    body = {k: v for k, v in m.items() if k != "crc32c"}
    from hpcckpt.manifest import _crc
    m["crc32c"] = _crc(body)                  # a well-formed, checksummed manifest with a bad value
    with open(path, "w") as f:
        json.dump(m, f)
    for entry in os.listdir(job):
        os.unlink(os.path.join(job, entry))
    proc = run_app(heap_dir, 2, steps=10, env={"EXPORTS": exports})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"export of epoch {latest} is unusable" in proc.stderr
    assert "resumes job 'app' at epoch 2 (step 4) from the export level" in proc.stderr
    assert answer(proc) == expected(2, 10)


CAMPAIGN = int(os.environ.get("HPCCKPT_HANG_CAMPAIGN", "12"))


@pytest.mark.parametrize("seed", range(CAMPAIGN))
def test_hang_campaign_every_run_ends_with_the_answer_or_a_clear_error(heap_dir, seed):
    """Seeded: an exception, a SIGKILL or a skipped checkpoint on a random rank at a random step."""
    rng = random.Random(seed)
    n, steps = rng.choice([2, 3, 4]), 8
    kind = rng.choice(["raise", "kill", "skip"])
    fault = f"{kind}:{rng.randrange(n)}:{rng.randint(1, steps)}"
    proc = run_app(heap_dir, n, steps, fault, restarts=2, env={"VOTE_TIMEOUT": "5"})
    assert proc.returncode == 0, (fault, proc.stderr[-3000:])
    assert answer(proc) == expected(n, steps), fault
