"""The particle example (examples/particles.py): particles leave and arrive every step in a
distributed table.  A rank killed mid-run resumes with the failure-free answer; a restart from
the export at 4 -> 2 and 4 -> 3 ranks, with route=, gives the answer of a reference run that
carries the same state across by hand (--dump, --load); a node lost with its heaps comes back from the partner level."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
from mpijobs import launch

pytestmark = pytest.mark.timeout(900)
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "particles.py")


def run(n: int, root: str, *extra: str, env: dict | None = None, relaunch: bool = False) -> tuple:
    cmd = [sys.executable, EXAMPLE, "--particles", "6000", "--steps", "30", "--root", root, *extra]
    cmd = ([sys.executable, "-m", "hpcckpt", "run", "-n", str(n), "--"] if relaunch else ["mpiexec", "-n", str(n)]) + cmd
    proc = launch(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sums = [line for line in proc.stdout.splitlines() if line.startswith("checksum:")]
    return proc, sums[-1]


@pytest.mark.parametrize("crash", ["after-prepare@3:1", "mid-copy@4:0"])
def test_a_rank_killed_mid_run_resumes_with_the_failure_free_answer(heap_dir, crash):
    _, answer = run(2, os.path.join(heap_dir, "clean"))
    killed, line = run(2, os.path.join(heap_dir, "killed"), env={"HPCCKPT_CRASH_AT": crash}, relaunch=True)
    assert "attempt 1/4 exited" in killed.stderr and "attempt 2 resumes job 'particles'" in killed.stderr
    assert line == answer


@pytest.mark.parametrize("then", [2, 3])
def test_a_restart_from_the_export_on_fewer_ranks_routes_particles_as_carried_by_hand(heap_dir, then):
    heaps, exports, state = (os.path.join(heap_dir, x) for x in ("heaps", "exports", "state.npz"))
    run(4, heaps, "--steps", "15", "--export-dir", exports, "--dump", state)
    shutil.rmtree(os.path.join(heaps, "particles"))               # only the export is left
    proc, line = run(then, heaps, "--export-dir", exports)
    assert "resumed at step 15 from the export level" in proc.stdout
    _, reference = run(then, os.path.join(heap_dir, "by-hand"), "--load", state)
    assert line == reference


def test_a_node_lost_with_its_heaps_comes_back_from_partner_copies(heap_dir):
    _, answer = run(4, os.path.join(heap_dir, "clean"))
    nodes = {"HPCCKPT_NODE_OF_RANK": "0,0,1,1"}
    root = os.path.join(heap_dir, "node{node}")
    run(4, root, "--steps", "15", "--redundancy", "partner", env=nodes)
    shutil.rmtree(os.path.join(heap_dir, "node1"))                 # node 1 is gone, heaps and partner copies
    proc, line = run(4, root, "--redundancy", "partner", env=nodes)
    assert "resumed at step 15 from the partner level" in proc.stdout
    assert line == answer
