"""Ghost cells that are state: a 2-D heat code whose boundary condition lives in the ghost rows
on the global edge (set once, never exchanged, as in the code the issue ported) restarts from
the export with no reset code of its own and ends with the failure-free answer, at the same
rank count and at 4 -> 2 and 4 -> 3."""
from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest
from mpijobs import launch

pytestmark = pytest.mark.timeout(900)

HEAT = """
import hashlib, sys, numpy as np, hpcckpt
from mpi4py import MPI
comm = MPI.COMM_WORLD
root, exports, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
N, M = 24, 10
up, down = comm.rank - 1, comm.rank + 1
rows = np.array_split(np.arange(N), comm.size)[comm.rank]
heap = hpcckpt.open("heat", comm, root=root, capacity="32MiB", export_dir=exports or None, export_every=1)
u = heap.array("u", (len(rows) + 2, M + 2), "f8", global_shape=(N, M), offset=(int(rows[0]), 0), halo=(1, 1))
if not heap.kernel_writable:
    heap.expose("u")
start = heap.meta["step"] if heap.epoch is not None else 0
if start == 0:                       # the boundary condition: set once, in the ghost cells
    if up < 0:
        u[0, :] = 1.0
    if down >= comm.size:
        u[-1, :] = 0.25
    u[:, 0], u[:, -1] = 0.5, -0.5
for step in range(start + 1, steps + 1):
    if up >= 0:
        comm.Sendrecv(u[1], dest=up, recvbuf=u[0], source=up)
    if down < comm.size:
        comm.Sendrecv(u[-2], dest=down, recvbuf=u[-1], source=down)
    u[1:-1, 1:-1] += 0.2 * (u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1])
    if step % 5 == 0:
        heap.checkpoint(step=step)
blocks = comm.gather(np.ascontiguousarray(u[1:-1, 1:-1]).tobytes())
if comm.rank == 0:
    print("checksum:", hashlib.sha256(b"".join(blocks)).hexdigest(), flush=True)
heap.close()
"""


def heat(n: int, root: str, exports: str, steps: int) -> str:
    proc = launch(["mpiexec", "-n", str(n), sys.executable, "-c", textwrap.dedent(HEAT), root, exports, str(steps)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("checksum:")][-1]


@pytest.mark.parametrize("then", [4, 2, 3])
def test_a_heat_code_restarted_from_the_export_keeps_its_boundary_ghosts(heap_dir, then):
    answer = heat(4, os.path.join(heap_dir, "clean"), "", 30)
    heaps, exports = os.path.join(heap_dir, "heaps"), os.path.join(heap_dir, "exports")
    heat(4, heaps, exports, 15)                 # stops at step 15, exported
    shutil.rmtree(heaps)                        # the heaps are lost: only the export is left
    assert heat(then, heaps, exports, 30) == answer
