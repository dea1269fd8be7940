"""The partner level under the real mpiexec: simulated nodes (HPCCKPT_NODE_OF_RANK, a {node}
root), a whole node lost between checkpoints, during one and during the rebuild, partners
lost together, damaged partner copies."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from hpcckpt.errors import HeapError
from hpcckpt.partner import pack_units, partners_of, unpack_units
from mpijobs import demo, launch, reference

NODES = {4: "0,0,1,1", 6: "0,0,1,1,2,2"}


def run(n: int, heap_dir: str, *extra: str, env: dict | None = None):
    """The demo at n ranks on n/2 simulated nodes, each node's heaps under heap_dir/node<k>."""
    return demo(n, os.path.join(heap_dir, "node{node}"), "--redundancy", "partner", *extra,
                env={"HPCCKPT_NODE_OF_RANK": NODES[n], **(env or {})})


def lose(heap_dir: str, *nodes: int) -> None:
    """A node is gone: its directory with every heap and partner copy on it."""
    for k in nodes:
        shutil.rmtree(os.path.join(heap_dir, f"node{k}"))


def test_a_unit_list_packs_and_unpacks_exactly_and_damage_is_refused():
    import numpy as np
    rng = np.random.default_rng(23)
    for n in (0, 1, 7, 1000):
        e = np.sort(rng.integers(0, 5, n)).astype(np.uint32)
        u = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        u[: n // 2].sort()
        groups, gaps = pack_units(e.tobytes(), u.tobytes())
        e2, u2 = unpack_units(groups, gaps)
        assert e2.tolist() == e.tolist() and u2.tolist() == u.tolist()
    groups, gaps = pack_units(np.array([1, 1], np.uint32).tobytes(), np.array([5, 300], np.uint64).tobytes())
    for g, v in ((groups, gaps[:-1]), (groups, gaps + b"\x00"), (groups, gaps[:-2] + b"\xf9"),
                 (groups[:4], gaps), (groups, b"\xff" * 10 + b"\x02"),
                 (groups, b"\xf1\x00\x05"), (groups, b"\x05\x00"), (groups, b"\x05\xfa\x00\x00\x05")):
        with pytest.raises(HeapError, match="list of units is damaged"):
            unpack_units(g, v)


def test_partners_form_a_ring_over_nodes():
    assert partners_of([0, 0, 1, 1, 2, 2]) == [2, 3, 4, 5, 0, 1]
    assert partners_of([0, 0, 0, 1]) == [3, 3, 3, 0]


@pytest.mark.parametrize("n", [4, 6])
def test_node_lost_between_checkpoints_restarts_from_partner_copies(heap_dir, n):
    proc, _ = run(n, heap_dir, "--kill-rank", "0", "--kill-at-step", "22")
    assert proc.returncode != 0
    wards = {4: [2, 3], 6: [4, 5]}[n]                 # the ranks whose partners live on node 0
    assert sorted(os.listdir(os.path.join(heap_dir, "node0", "t"))) == \
        [f"partner-rank{w}.heap" for w in wards] + ["rank0.heap", "rank1.heap"]
    lose(heap_dir, 1)
    proc, line = run(n, heap_dir)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 4 at step 20 (partner level)" in proc.stdout
    assert line == reference(n, heap_dir)


@pytest.mark.parametrize("n", [4, 6])
def test_node_lost_during_a_checkpoint_restarts_from_the_last_committed_epoch(heap_dir, n):
    proc, _ = run(n, heap_dir, env={"HPCCKPT_CRASH_AT": "mid-copy@3:2,3"})   # node 1's ranks
    assert proc.returncode != 0
    lose(heap_dir, 1)
    proc, line = run(n, heap_dir)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 2 at step 10 (partner level)" in proc.stdout
    assert line == reference(n, heap_dir)


@pytest.mark.parametrize("n", [4, 6])
def test_node_lost_during_the_rebuild_is_rebuilt_again(heap_dir, n):
    assert run(n, heap_dir, "--kill-rank", "1", "--kill-at-step", "17")[0].returncode != 0
    lose(heap_dir, 1)
    proc, _ = run(n, heap_dir, env={"HPCCKPT_CRASH_AT": "mid-rebuild:2"})
    assert proc.returncode != 0                         # rank 2 died half rebuilt
    proc, line = run(n, heap_dir)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 3 at step 15 (partner level)" in proc.stdout
    assert line == reference(n, heap_dir)


def test_two_nodes_that_are_each_others_partners_fall_back_to_the_export(heap_dir):
    exports = os.path.join(heap_dir, "exports")
    assert run(6, heap_dir, "--export-dir", exports, "--export-every", "2")[0].returncode == 0
    lose(heap_dir, 0, 1)                                # node 0's copies live on node 1
    proc, line = run(6, heap_dir, "--export-dir", exports)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from epoch 6 at step 30 (export level)" in proc.stdout
    assert line == reference(6, heap_dir)


def test_without_partner_copies_or_export_the_error_names_ranks_and_levels(heap_dir):
    assert run(4, heap_dir, "--kill-rank", "0", "--kill-at-step", "12")[0].returncode != 0
    lose(heap_dir, 1)
    os.unlink(os.path.join(heap_dir, "node0", "t", "partner-rank2.heap"))
    proc, _ = run(4, heap_dir)
    assert proc.returncode != 0
    assert "rank(s) [2, 3] lost their heaps (local level)" in proc.stderr
    assert "partner copies of rank(s) [2] are missing" in proc.stderr and "Traceback" not in proc.stderr


def test_a_damaged_partner_copy_is_detected_and_never_restored(heap_dir):
    assert run(4, heap_dir, "--kill-rank", "0", "--kill-at-step", "12")[0].returncode != 0
    lose(heap_dir, 1)
    mirror = os.path.join(heap_dir, "node0", "t", "partner-rank2.heap")
    damage_checkpoint_copies(mirror)
    proc, _ = run(4, heap_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "partner" in proc.stderr and "checksum mismatch" in proc.stderr


def damage_checkpoint_copies(path: str) -> None:
    """Flip the first byte that holds data in both checkpoint copies of a heap file."""
    from hpcckpt.partner import MirrorHeap
    h = MirrorHeap.open(path, readonly=True)
    info = h.info
    h._native.abandon()
    with open(path, "r+b") as f:
        for k in (1, 2):
            start = info["off_data"] + k * info["capacity"]
            f.seek(start)
            block = f.read(info["capacity"])
            at = next(i for i, b in enumerate(block) if b)
            f.seek(start + at)
            f.write(bytes([block[at] ^ 0xFF]))


def test_info_and_verify_understand_partner_copies(heap_dir):
    assert run(4, heap_dir, "--kill-rank", "0", "--kill-at-step", "12")[0].returncode != 0
    lose(heap_dir, 1)
    job = os.path.join(heap_dir, "node{node}", "t")
    info = launch([sys.executable, "-m", "hpcckpt", "info", job])
    assert info.returncode == 0, info.stderr
    assert "restarts at epoch 2, rebuilding rank(s) [2, 3] from their partner copies" in info.stdout
    assert "partner copy of rank 2/4" in info.stdout
    check = launch([sys.executable, "-m", "hpcckpt", "verify", job])
    assert check.returncode == 0 and check.stdout.count(": ok,") == 4, check.stdout + check.stderr


@pytest.mark.parametrize("value,words", [("0,a,1,1", "give one node number per rank"),
                                         ("0,1", "names 2 ranks, the job has 4")])
def test_bad_node_lists_are_refused_in_one_line(heap_dir, value, words):
    proc = launch([sys.executable, "-m", "hpcckpt", "run", "-n", "4", "--max-restarts", "0", "--", sys.executable,
                   "-m", "hpcckpt.demo", "--steps", "2", "--redundancy", "partner", "--root", heap_dir],
                  {"HPCCKPT_NODE_OF_RANK": value})
    assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_unknown_redundancy_is_refused():
    import hpcckpt
    with pytest.raises(ValueError, match="redundancy must be 'none' or 'partner'"):
        hpcckpt.open("t", comm=None, redundancy="sometimes")
