"""No silent wrong data: damaged heap files are repaired, rolled back consistently, or refused.

The campaign and the fuzzer run in their own process (tests/corruption.py) so that a crash or
a hang there fails the test instead of the test run.  HPCCKPT_CORRUPTION_TRIALS sets the
number of trials (the long run: 20000).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import hpcckpt
from corruption import damage, regions
from mpijobs import demo, reference

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = 4096
CATALOG = 6 * PAGE                 # superblock, four state pages, superblock twin
TRIALS = int(os.environ.get("HPCCKPT_CORRUPTION_TRIALS", "400"))


def run_campaign(*args: str) -> collections.Counter:
    """Run tests/corruption.py; every trial must finish and none may return wrong data."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "corruption.py"), *args], capture_output=True,
                          text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    done = [r for r in rows if "outcome" in r]
    last = rows[-1] if rows else None
    assert proc.returncode == 0 and len(done) == int(args[args.index("--trials") + 1]), \
        f"the campaign died (exit {proc.returncode}) at {last}: {proc.stderr[-2000:]}"
    wrong = [r for r in done if r["outcome"] == "WRONG"]
    assert not wrong, f"{len(wrong)} trial(s) went wrong, first: {wrong[0]}"
    counts = collections.Counter(r["outcome"] for r in done)
    print(f"corruption {' '.join(args)}: {dict(counts)}")
    return counts


@pytest.mark.parametrize("seed", [11, 12])
def test_seeded_corruption_campaign_opens_nothing_wrong(seed):
    counts = run_campaign("--seed", str(seed), "--trials", str(TRIALS))
    assert counts["refused"] and counts["exact"] and counts["repaired"]


def test_fuzzed_files_never_crash_open_info_or_verify():
    run_campaign("--fuzz", "--seed", "5", "--trials", str(TRIALS // 2))


def _two_epochs(path: str, tracker: str = "auto") -> None:
    heap = hpcckpt.Heap.create(path, "1MiB", tracker=tracker)
    a = heap.array("a", 4)
    a[:] = 1
    heap.checkpoint(step=1)
    a[:] = 2
    heap.checkpoint(step=2)
    heap._native.abandon()


def _poke(path: str, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _xor(path: str, at: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ mask]))


ENTRY_TAG = 192                    # layout.h: offset of hk_entry.tag (inline tag of a one-unit object)


def test_a_flipped_slot_bit_in_a_tag_is_refused_instead_of_restoring_the_older_copy(heap_path):
    _two_epochs(heap_path)
    _xor(heap_path, CATALOG + ENTRY_TAG + 3, 0x80)           # bit 31 of `latest`: the slot
    with pytest.raises(hpcckpt.CorruptHeapError, match="do not match the record"):
        hpcckpt.Heap.open(heap_path)


@pytest.mark.parametrize("byte,mask", [(0, 0x01), (3, 0x40), (4, 0x01), (7, 0x01)])
def test_a_flipped_born_or_dead_epoch_never_hides_or_wipes_an_object(heap_path, byte, mask):
    _two_epochs(heap_path)
    with open(heap_path, "rb") as f:
        before = f.read()
    _xor(heap_path, CATALOG + byte, mask)
    try:
        heap = hpcckpt.Heap.open(heap_path)
    except hpcckpt.CorruptHeapError:
        with open(heap_path, "rb") as f:   # refused before anything was written
            after = bytearray(f.read())
        after[CATALOG + byte] ^= mask
        assert bytes(after) == before
        return
    assert heap["a"].tolist() == [2, 2, 2, 2] and heap.meta == {"step": 2}   # a dead epoch > E is reset
    heap.close()


def test_a_zeroed_catalog_entry_is_refused_and_its_bytes_never_reach_a_new_object(heap_path):
    _two_epochs(heap_path)
    _poke(heap_path, CATALOG, bytes(512))
    with pytest.raises(hpcckpt.CorruptHeapError, match="do not match the record"):
        hpcckpt.Heap.open(heap_path)


def test_zeroed_bytes_across_both_epoch_records_are_repaired_from_their_twins(heap_path):
    _two_epochs(heap_path)
    _poke(heap_path, 2 * PAGE - 256, bytes(512))            # the end of page 1 and the start of page 2
    _poke(heap_path, PAGE, bytes(512))                       # and the head of record slot 0
    with pytest.warns(hpcckpt.RepairWarning, match="epoch record"):
        heap = hpcckpt.Heap.open(heap_path)
    assert heap.restored and heap.epoch == 2 and heap["a"].tolist() == [2, 2, 2, 2]
    heap.close()


def test_a_damaged_newest_record_of_a_clean_heap_keeps_data_and_meta_together(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        a = heap.array("a", 4)
        for step in (1, 2, 3):
            a[:] = step
            heap.checkpoint(step=step)
    _xor(heap_path, 2 * PAGE + 40, 0x10)                     # record slot 1 (epoch 3), copy 0
    with pytest.warns(hpcckpt.RepairWarning, match="epoch record 3"):
        heap = hpcckpt.Heap.open(heap_path)
    assert heap.epoch == 3 and heap.meta == {"step": 3} and heap["a"].tolist() == [3] * 4
    heap.close()
    _xor(heap_path, 2 * PAGE + 40, 0x10)                     # both copies: no record of epoch 3 at all
    _xor(heap_path, 4 * PAGE + 40, 0x10)
    with pytest.warns(hpcckpt.RepairWarning, match="record is gone"):
        heap = hpcckpt.Heap.open(heap_path)                   # a consistent rollback: data and meta of epoch 2
    assert heap.restored and heap.epoch == 2 and heap.meta == {"step": 2} and heap["a"].tolist() == [2] * 4
    heap.close()


def test_a_lowered_high_water_mark_is_repaired_from_the_header_twin(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        for i in range(20):
            heap.array(f"a{i}", 4)[:] = i
        heap.checkpoint()
    _poke(heap_path, PAGE + 2048 + 16, struct.pack("<Q", 1))  # hk_header.entries_hwm, copy 0
    with pytest.warns(hpcckpt.RepairWarning, match="header"):
        heap = hpcckpt.Heap.open(heap_path)
    assert len(heap) == 20 and heap["a19"].tolist() == [19] * 4
    heap.close()


def test_a_flipped_bit_in_free_space_is_cleared_before_it_is_handed_out(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        heap.array("a", 4)[:] = 1
        off_data = heap.info["off_data"]
    _xor(heap_path, off_data + 100 * PAGE + 5, 0x01)
    heap = hpcckpt.Heap.open(heap_path)
    with pytest.warns(hpcckpt.RepairWarning, match="free space"):
        b = heap.array("b", 200 * 512)                        # most of the heap: it covers page 100
    assert not b.any()
    heap.close()


def test_flipped_working_data_of_a_clean_heap_is_caught_by_verify_and_repaired_at_open(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        heap.array("u", 1000)[:] = 7.0
        heap.checkpoint(step=1)
        off = heap.info["off_data"] + heap._native.offset(heap._names["u"], 0) - heap.info["views_offset"]
    _xor(heap_path, off + 800, 0x04)
    proc = subprocess.run([sys.executable, "-m", "hpcckpt", "verify", heap_path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and heap_path in proc.stderr and "working data of 'u'" in proc.stderr
    assert "bytes 0..4096 of the object" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.warns(hpcckpt.RepairWarning, match="restored from its checkpoint copy"):
        heap = hpcckpt.Heap.open(heap_path)
    assert (heap["u"] == 7.0).all()
    heap.close()


def test_an_old_format_heap_is_refused_with_its_version_and_what_to_do(heap_path):
    hpcckpt.Heap.create(heap_path, "1MiB").close()
    _poke(heap_path, 8, struct.pack("<II", 1, 0))
    with pytest.raises(hpcckpt.FormatVersionError, match=r"format version 1\.0.*reads format 2.*export"):
        hpcckpt.Heap.open(heap_path)


@pytest.mark.parametrize("content", [b"", b"x" * 10, os.urandom(3 * PAGE)])
def test_info_and_verify_answer_a_non_heap_file_in_one_line(heap_path, content):
    with open(heap_path, "wb") as f:
        f.write(content)
    for cmd in ("info", "verify"):
        proc = subprocess.run([sys.executable, "-m", "hpcckpt", cmd, heap_path], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1 and heap_path in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_clean_close_seals_writes_since_the_last_checkpoint(heap_path):
    with hpcckpt.Heap.create(heap_path, "1MiB") as heap:
        a = heap.array("a", 4)
        a[:] = 1
        heap.checkpoint(step=1)
        a[:] = 5
    heap = hpcckpt.Heap.open(heap_path)
    assert heap.epoch == 2 and heap.meta == {"step": 1} and heap["a"].tolist() == [5] * 4
    heap._native.abandon()                                    # a crash now keeps what the close sealed
    heap = hpcckpt.Heap.open(heap_path)
    assert heap.restored and heap["a"].tolist() == [5] * 4
    heap.close()
    heap = hpcckpt.Heap.open(heap_path)
    assert heap.epoch == 2                                    # nothing changed: no new epoch
    heap.close()


def _damaged_rank_runs(heap_dir: str, seed: int, export: bool, trials: int = 3) -> collections.Counter:
    """Run the demo at 2 ranks to step 20; then, from that state each time, damage rank 1's heap
    by one seeded fault and run on to step 30: the answer must be the failure-free one, or
    (without an export) a clear error that names the file."""
    rng = np.random.default_rng(seed)
    job, saved = os.path.join(heap_dir, "job"), os.path.join(heap_dir, "saved")
    extra = ["--export-dir", os.path.join(job, "x"), "--export-every", "2"] if export else []
    assert demo(2, os.path.join(job, "h"), "--steps", "20", *extra)[0].returncode == 0
    shutil.copytree(job, saved)
    path = os.path.join(job, "h", "t", "rank1.heap")
    regs = [r for r in regions(path) if r[0] != "whole file"]
    outcomes = collections.Counter()
    for _ in range(trials):
        shutil.rmtree(job)
        shutil.copytree(saved, job)
        what = damage(path, rng, regs)
        proc, line = demo(2, os.path.join(job, "h"), *extra)
        if proc.returncode == 0:
            assert line == reference(2, heap_dir), f"wrong answer after {what}: {proc.stderr[-1500:]}"
            outcomes["restarted"] += 1
        else:
            assert not export, f"no restart from the export after {what}: {proc.stderr[-1500:]}"
            assert path in proc.stderr and "Traceback" not in proc.stderr, f"{what}: {proc.stderr[-1500:]}"
            outcomes["refused"] += 1
    print(f"one damaged rank, export={export}: {dict(outcomes)}")
    return outcomes


def test_one_damaged_rank_never_gives_wrong_data_and_restarts_from_the_export(heap_dir):
    assert _damaged_rank_runs(heap_dir, 21, export=True)["restarted"] == 3


def test_one_damaged_rank_without_an_export_restarts_or_names_the_damaged_file(heap_dir):
    _damaged_rank_runs(heap_dir, 22, export=False)
