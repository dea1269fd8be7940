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

SELFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "slurm_selftest.sh")


@pytest.mark.parametrize("mode", ["signal", "timelimit", "partner"])
def test_demo_sbatch_requeues_and_resumes_to_the_failure_free_answer(mode):
    if os.geteuid() != 0:
        pytest.skip("the private Slurm of the self-test runs as root")
    debian_tool("slurmctld", "slurm-wlm munge")
    proc = subprocess.run(["bash", SELFTEST], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, SELFTEST_MODE=mode))
    script = "partner.sbatch" if mode == "partner" else "demo.sbatch"
    assert proc.returncode == 0 and f"PASS: jobs/{script} under Slurm ({mode} mode" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-2000:]
