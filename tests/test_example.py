"""The README's example (examples/stencil.py) at 2 ranks: killed in a checkpoint and resumed by
``hpcckpt run``, it ends with the answer of a run that was never killed; its heaps removed, it
resumes at 3 ranks from the export with the same answer.  A declaration whose global size depends
on the rank count is refused at a restart on another count, saying what the export holds."""
from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest
from mpijobs import launch

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "stencil.py")


def run(root: str, env: dict | None = None, n: int = 2, *extra: str):
    proc = launch([sys.executable, "-m", "hpcckpt", "run", "-n", str(n), "--", sys.executable, EXAMPLE,
                   "--steps", "60", "--n", "128", "--root", root, *extra], env=env)
    sums = [line for line in proc.stdout.splitlines() if line.startswith("checksum:")]
    return proc, sums[-1] if sums else None


def test_readme_example_killed_mid_checkpoint_resumes_to_the_failure_free_answer(heap_dir):
    clean, answer = run(os.path.join(heap_dir, "clean"))
    assert clean.returncode == 0 and answer, clean.stderr
    killed, line = run(os.path.join(heap_dir, "killed"), env={"HPCCKPT_CRASH_AT": "after-prepare@3:1"})
    assert killed.returncode == 0, killed.stderr
    assert "attempt 1/4 exited" in killed.stderr and "attempt 2 resumes job 'stencil' at epoch" in killed.stderr
    assert line == answer


def test_readme_example_resumes_at_3_ranks_from_the_export_of_2(heap_dir):
    clean, answer = run(os.path.join(heap_dir, "clean"))
    assert clean.returncode == 0 and answer, clean.stderr
    root, exports = os.path.join(heap_dir, "heaps"), os.path.join(heap_dir, "exports")
    first, _ = run(root, None, 2, "--export-dir", exports)   # exported every 5th checkpoint: step 50
    assert first.returncode == 0, first.stderr
    shutil.rmtree(os.path.join(root, "stencil"))
    resumed, line = run(root, None, 3, "--export-dir", exports)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumes job 'stencil' at epoch 5 (step 50) from the export level" in resumed.stderr
    assert line == answer


SIZED_BY_RANKS = """
import sys, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
heap = hpcckpt.open("sized", comm, root=sys.argv[1], capacity="16MiB", export_dir=sys.argv[2])
try:
    heap.pool("cells", "f8", 100, global_count=100 * comm.size, offset=100 * comm.rank)   # the old README's way
except KeyError as e:
    print("refused", e, flush=True)
heap.checkpoint(step=1)
heap.export()
heap.close()
"""


@pytest.mark.timeout(600)
def test_a_global_size_that_depends_on_the_rank_count_is_refused_saying_what_the_export_holds(heap_dir):
    root, exports = os.path.join(heap_dir, "heaps"), os.path.join(heap_dir, "exports")
    cmd = lambda n: ["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(SIZED_BY_RANKS), root, exports]
    assert launch(cmd(2), timeout=300).returncode == 0
    shutil.rmtree(os.path.join(root, "sized"))
    proc = launch(cmd(3), timeout=300)
    said = ("the export restored here (epoch 1) holds 'cells' with global shape [200]; the program declared "
            "global shape [300]")   # ranks' lines may interleave: count what they said
    assert proc.stdout.count(said) == 3 and proc.stdout.count("must not depend on the number of ranks") == 3, \
        proc.stdout + proc.stderr
