#!/bin/bash
# Kill a rank of the demo mid-run, let `hpcckpt run` relaunch it from its last checkpoint,
# and check that the answer equals that of a failure-free run without hpcckpt.
#
#   pip install . && jobs/demo_mpiexec.sh
#
# Rank 2 SIGKILLs itself after step 55 (first attempt only); the relaunched job resumes at
# step 50, the last checkpoint (--checkpoint-every 10), and finishes at step 200.
set -euo pipefail
export HPCCKPT_ROOT=$(mktemp -d /dev/shm/hpcckpt-demo.XXXXXX)  # fresh heaps, removed at exit
# at exit: the heaps (hpcckpt run removes the MPICH segments its killed attempt's ranks recorded)
trap 'rm -rf "$HPCCKPT_ROOT"' EXIT
cd "$HPCCKPT_ROOT"  # outside the source tree, so that Python imports the installed hpcckpt

hpcckpt run -n 4 -- python -m hpcckpt.demo --kill-rank 2 --kill-at-step 55 | tee killed.out
mpiexec -n 4 python -m hpcckpt.demo --no-checkpoint --quiet > reference.out

got=$(tail -n 1 killed.out)
want=$(tail -n 1 reference.out)
if [ "$got" = "$want" ]; then
    echo "OK: the relaunched run matches the failure-free run ($want)"
else
    echo "MISMATCH: relaunched '$got', failure-free '$want'" >&2
    exit 1
fi
