"""jobs/demo.sbatch under real Slurm, on this one machine: a private munged, slurmctld and
slurmd (jobs/slurm_selftest.sh starts them and stops them by PID). The job requeues itself
after the signal a time limit sends, and the resumed job ends with the failure-free checksum:
once with the signal sent by hand, once with a real two-minute time limit; and
jobs/partner.sbatch on two simulated nodes, one of them lost after a killed first attempt."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import debian_tool

from hpcckpt.run import kill_tree

SELFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "slurm_selftest.sh")


@pytest.mark.timeout(1300)
@pytest.mark.parametrize("mode", ["signal", "timelimit", "partner"])
def test_demo_sbatch_requeues_and_resumes_to_the_failure_free_answer(mode):
    if os.geteuid() != 0:
        pytest.skip("the private Slurm of the self-test runs as root")
    debian_tool("slurmctld", "slurm-wlm munge")
    proc = subprocess.Popen(["bash", SELFTEST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SELFTEST_MODE=mode), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=1000)
    except subprocess.TimeoutExpired:
        proc.terminate()                      # its EXIT trap stops slurmd, slurmctld and munged by PID
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"the Slurm self-test ({mode}) did not end in 1000 s: {out[-3000:]}{err[-2000:]}")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)               # whatever is left of it, daemons included, by PID
            proc.wait()
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    script = "partner.sbatch" if mode == "partner" else "demo.sbatch"
    assert proc.returncode == 0 and f"PASS: jobs/{script} under Slurm ({mode} mode" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-2000:]
