"""The README's example (examples/stencil.py) at 2 ranks: killed in a checkpoint and resumed by
``hpcckpt run``, it ends with the answer of a run that was never killed."""
from __future__ import annotations

import os
import sys

from mpijobs import launch

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "stencil.py")


def run(root: str, env: dict | None = None):
    proc = launch([sys.executable, "-m", "hpcckpt", "run", "-n", "2", "--", sys.executable, EXAMPLE,
                   "--steps", "60", "--n", "128", "--root", root], env=env)
    sums = [line for line in proc.stdout.splitlines() if line.startswith("checksum:")]
    return proc, sums[-1] if sums else None


def test_readme_example_killed_mid_checkpoint_resumes_to_the_failure_free_answer(heap_dir):
    clean, answer = run(os.path.join(heap_dir, "clean"))
    assert clean.returncode == 0 and answer, clean.stderr
    killed, line = run(os.path.join(heap_dir, "killed"), env={"HPCCKPT_CRASH_AT": "after-prepare@3:1"})
    assert killed.returncode == 0, killed.stderr
    assert "attempt 1/4 exited" in killed.stderr and "attempt 2 resumes job 'stencil' at epoch" in killed.stderr
    assert line == answer
