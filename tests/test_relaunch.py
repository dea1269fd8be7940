"""The relauncher ``hpcckpt run`` with tiny jobs under the real mpiexec (no heap needed).

run.py is started as a script, so these tests work before the native core is built.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "src" / "hpcckpt" / "run.py"
sys.path.insert(0, str(RUN_PY.parent))
from run import kill_tree  # noqa: E402  (run.py stands alone: these tests work before the core is built)
pytestmark = pytest.mark.timeout(240)


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return path


def relaunch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``hpcckpt run ARGS`` to completion; a hang fails the test instead of stalling it, and
    everything it started (mpiexec, its proxy, the ranks) is killed by PID."""
    proc = subprocess.Popen([sys.executable, str(RUN_PY), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def attempt_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hpcckpt run: attempt")]


def test_relaunches_until_an_attempt_succeeds(tmp_path: Path) -> None:
    job = script(tmp_path, """
        import os, sys
        sys.exit(3 if os.environ["HPCCKPT_ATTEMPT"] == "1" else 0)
    """)
    done = relaunch("-n", "1", "--", sys.executable, str(job))
    assert done.returncode == 0, done.stderr
    assert attempt_lines(done.stderr) == [
        "hpcckpt run: attempt 1/4 exited with 3; relaunching",
        "hpcckpt run: attempt 2/4 succeeded",
    ]


def test_gives_up_after_max_restarts_with_the_last_exit_code(tmp_path: Path) -> None:
    job = script(tmp_path, """
        import os, sys
        open(os.environ["HPCCKPT_RUN_STATUS"], "a").write("opened\\n")   # as hpcckpt.open does
        sys.exit(5)
    """)
    done = relaunch("-n", "1", "--max-restarts", "2", "--", sys.executable, str(job))
    assert done.returncode == 5
    lines = attempt_lines(done.stderr)
    assert len(lines) == 3
    assert lines[-1] == "hpcckpt run: attempt 3/3 exited with 5; giving up"


def test_two_attempts_that_die_before_opening_their_heaps_are_not_relaunched_again(tmp_path: Path) -> None:
    job = script(tmp_path, "import sys; sys.exit(5)\n")   # say, an ImportError before hpcckpt.open
    done = relaunch("-n", "1", "--max-restarts", "5", "--", sys.executable, str(job))
    assert done.returncode == 5
    lines = attempt_lines(done.stderr)
    assert len(lines) == 2 and "attempts 1 and 2 died before opening their heaps" in lines[-1], lines


def test_relaunches_after_rank_killed_and_removes_only_the_segments_its_ranks_recorded(tmp_path: Path) -> None:
    job = script(tmp_path, f"""
        import os, signal
        from mpi4py import MPI
        rank, attempt = MPI.COMM_WORLD.Get_rank(), os.environ["HPCCKPT_ATTEMPT"]
        maps = [line.split(None, 5) for line in open("/proc/self/maps")]   # as hpcckpt.open records them
        mine = {{f[5].strip() for f in maps if len(f) == 6 and f[5].startswith("/dev/shm/mpich_")}}
        open(os.environ["HPCCKPT_RUN_STATUS"], "a").write("".join(f"segment: {{p}}\\n" for p in mine))
        open(os.path.join({str(tmp_path)!r}, f"segments-{{attempt}}-{{rank}}"), "w").write("\\n".join(mine))
        open(os.path.join({str(tmp_path)!r}, f"ran-{{attempt}}-{{rank}}"), "w").close()
        MPI.COMM_WORLD.Barrier()
        if rank == 1 and attempt == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        MPI.COMM_WORLD.Barrier()
    """)
    # another job's segment that its MPI_Init is creating right now: not mapped yet, never recorded
    decoy = Path(f"/dev/shm/mpich_shm_hpcckpt_test_decoy_{os.getpid()}")
    decoy.write_bytes(b"")
    try:
        done = relaunch("-n", "2", "--", sys.executable, str(job))
        assert done.returncode == 0, done.stderr
        lines = attempt_lines(done.stderr)
        assert len(lines) == 2 and lines[0].endswith("; relaunching") and lines[1].endswith("succeeded")
        assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-1-0", "ran-1-1", "ran-2-0", "ran-2-1"]
        assert decoy.exists()                                    # not ours: never touched
        recorded = {p for f in tmp_path.glob("segments-*") for p in f.read_text().split()}
        assert recorded and not any(os.path.exists(p) for p in recorded)   # the killed attempt's segments are gone
    finally:
        decoy.unlink(missing_ok=True)


def test_attempts_killed_by_a_signal_before_opening_are_relaunched(tmp_path: Path) -> None:
    job = script(tmp_path, """
        import os, signal
        if int(os.environ["HPCCKPT_ATTEMPT"]) <= 3:   # a node lost during start-up, three times
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = relaunch("-n", "1", "--max-restarts", "3", "--", sys.executable, str(job))
    assert done.returncode == 0, done.stderr
    assert len(attempt_lines(done.stderr)) == 4 and attempt_lines(done.stderr)[-1].endswith("succeeded")


def test_the_same_error_twice_from_the_same_checkpoint_stops_relaunching(tmp_path: Path) -> None:
    job = script(tmp_path, """
        import os, sys
        status = os.environ["HPCCKPT_RUN_STATUS"]
        open(status, "a").write("resumes job 'j' at epoch 3 from the local level\\n")   # as hpcckpt.open does
        open(status, "a").write("error: KeyError: 'u'\\n")                              # as its excepthook does
        sys.exit(1)
    """)
    done = relaunch("-n", "1", "--max-restarts", "5", "--", sys.executable, str(job))
    assert done.returncode == 1
    lines = attempt_lines(done.stderr)
    assert len(lines) == 2 and "same error from the same checkpoint (KeyError: 'u')" in lines[-1], lines


def test_sigterm_reaches_the_ranks_and_stops_relaunching(tmp_path: Path) -> None:
    job = script(tmp_path, f"""
        import os, signal, sys, time
        from mpi4py import MPI
        out = os.path.join({str(tmp_path)!r}, f"rank{{MPI.COMM_WORLD.Get_rank()}}")
        def stop(signum, frame):
            open(out + ".term", "w").close()
            sys.exit(7)
        signal.signal(signal.SIGTERM, stop)
        with open(out + ".pid", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(100)
    """)
    proc = subprocess.Popen([sys.executable, str(RUN_PY), "-n", "2", "--", sys.executable, str(job)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert attempt_lines(stderr) == [f"hpcckpt run: attempt 1/4 exited with {proc.returncode}; not relaunching after SIGTERM"]
    assert sorted(p.name for p in tmp_path.glob("rank*.term")) == ["rank0.term", "rank1.term"]
    for pid_file in tmp_path.glob("rank*.pid"):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_missing_command_says_to_put_it_after_double_dash() -> None:
    done = relaunch("-n", "2", "python", "app.py")
    assert done.returncode == 2
    assert "put the command after --, e.g. hpcckpt run -n 2 -- python app.py" in done.stderr


def test_a_command_that_cannot_be_executed_is_not_relaunched() -> None:
    proc = relaunch("-n", "2", "--", "no-such-program-here")
    assert proc.returncode == 2 and "no-such-program-here: no such program" in proc.stderr
    assert "attempt" not in proc.stderr


def test_json_reports_every_attempt(tmp_path: Path) -> None:
    job = script(tmp_path, """
        import os, signal, sys
        if os.environ["HPCCKPT_ATTEMPT"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = relaunch("-n", "1", "--json", "--", sys.executable, str(job))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])   # the last line: mpiexec may print before it
    assert report["exit"] == 0 and [a["exit"] for a in report["attempts"]][1] == 0
    assert report["attempts"][0]["by_signal"] and report["attempts"][0]["opened"] is False
    bad = relaunch("-n", "1", "--json")
    assert bad.returncode == 2 and "put the command after --" in bad.stderr and "-- --json" not in bad.stderr
