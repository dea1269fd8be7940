"""What the commands write and delete (issue 22, items 3, 4, 5 and 12): nothing outside the
directories given, never a file that is not a heap, and what `info` says of an export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import hpcckpt
from hpcckpt.manifest import load_manifest


def cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def tree(top: str) -> dict[str, int]:
    """Every file and directory under `top` with its size (-1 for a directory)."""
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), top)] = -1
        for n in files:
            out[os.path.relpath(os.path.join(d, n), top)] = os.path.getsize(os.path.join(d, n))
    return out


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)


def make_job(directory: str, job: str = "j", ranks: int = 2, rows: int = 60) -> None:
    """Heaps of a stopped job of `ranks` ranks: a distributed array 'u' of rows x 8, two epochs."""
    os.makedirs(directory, exist_ok=True)
    for r in range(ranks):
        with hpcckpt.Heap.create(os.path.join(directory, f"rank{r}.heap"), "4MiB", job=job, rank=r,
                                 world_size=ranks) as heap:
            u = heap.array("u", (rows, 8), global_shape=(rows * ranks, 8), offset=(rows * r, 0))
            u[:] = r
            heap.checkpoint(step=1)
            u[:] = r + 10
            heap.checkpoint(step=2)


@pytest.fixture
def exported(heap_dir):
    """(heap directory of job 'j', its export directory DIR/j) after `hpcckpt export`."""
    heaps, exports = os.path.join(heap_dir, "heaps", "j"), os.path.join(heap_dir, "exports")
    make_job(heaps)
    out = cli("export", heaps, "--to", exports)
    assert out.returncode == 0, out.stderr
    return heaps, os.path.join(exports, "j")


def flip_block_byte(path: str, dataset: str = "u") -> None:
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 8)
        b = f.read(1)
        f.seek(offset + 8)
        f.write(bytes([b[0] ^ 0x10]))


# -- rm (item 3) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"x" * 100, os.urandom(30000), b"\0" * 30000])
def test_rm_refuses_a_file_that_is_not_a_heap_and_removes_nothing(heap_dir, content):
    job = os.path.join(heap_dir, "j")
    make_job(job)
    with open(os.path.join(job, "rank2.heap"), "wb") as f:
        f.write(content)
    before = tree(heap_dir)
    out = cli("rm", job)
    one_line_error(out, os.path.join(job, "rank2.heap"), "not an hpcckpt heap", "nothing was removed")
    assert tree(heap_dir) == before
    out = cli("rm", os.path.join(job, "rank2.heap"))
    one_line_error(out, "not an hpcckpt heap")
    assert tree(heap_dir) == before


def test_rm_refuses_a_symbolic_link_and_removes_nothing(heap_dir):
    job, elsewhere = os.path.join(heap_dir, "j"), os.path.join(heap_dir, "elsewhere")
    make_job(job)
    make_job(elsewhere, job="other", ranks=1)
    os.symlink(os.path.join(elsewhere, "rank0.heap"), os.path.join(job, "rank2.heap"))
    before = tree(heap_dir)
    one_line_error(cli("rm", job), "rank2.heap", "symbolic link")
    assert tree(heap_dir) == before


def test_rm_removes_a_heap_whose_first_superblock_is_damaged(heap_dir):
    job = os.path.join(heap_dir, "j")
    make_job(job, ranks=1)
    with open(os.path.join(job, "rank0.heap"), "r+b") as f:
        f.write(b"\0" * 64)   # the twin at page 5 still says it is a heap
    out = cli("rm", job, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["removed"] == [os.path.join(job, "rank0.heap")] and not os.path.exists(job)


def test_rm_holds_each_heaps_lock_while_it_unlinks_it(heap_dir, monkeypatch, capsys):
    from hpcckpt import _cli_heap
    from hpcckpt.locks import holder

    job = os.path.join(heap_dir, "j")
    make_job(job, ranks=3)
    seen = []
    real = os.unlink

    def unlink(path, *a, **k):
        seen.append((path, holder(path)))
        return real(path, *a, **k)
    monkeypatch.setattr(_cli_heap.os, "unlink", unlink)
    assert _cli_heap.rm([job]) == 0
    assert len(seen) == 3 and all(pid == os.getpid() for _, pid in seen), seen
    assert "removed 3 heap(s)" in capsys.readouterr().out and not os.path.exists(job)


def test_rm_of_a_heap_file_keeps_its_directory(heap_dir):
    make_job(heap_dir, ranks=1)
    other = os.path.join(heap_dir, "notes.txt")
    open(other, "w").close()
    out = cli("rm", os.path.join(heap_dir, "rank0.heap"))
    assert out.returncode == 0 and os.path.exists(other) and not os.path.exists(os.path.join(heap_dir, "rank0.heap"))


# -- restore (item 4) ------------------------------------------------------------------------------------
def craft(job_dir: str, epoch: int, **changes) -> None:
    """Rewrite the manifest of `epoch` with `changes`, its checksum recomputed (a crafted file)."""
    m = load_manifest(job_dir, epoch)
    for k, v in changes.items():
        setattr(m, k, v)
    with open(os.path.join(job_dir, f"e{epoch}.json"), "w") as f:
        f.write(m.to_json())


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "..", ".", "a/b", ""])
def test_restore_refuses_a_manifest_job_name_that_is_not_a_plain_name(heap_dir, exported, name):
    _, job_dir = exported
    craft(job_dir, 2, job=name)
    root = os.path.join(heap_dir, "root", "inner")
    os.makedirs(root)
    before = tree(heap_dir)
    out = cli("restore", job_dir, "--to", root, "-n", "2", "--capacity", "4MiB")
    one_line_error(out, "--name")
    assert tree(heap_dir) == before and not os.path.exists("/tmp/victim")
    out = cli("restore", job_dir, "--to", root, "-n", "2", "--capacity", "4MiB", "--name", "ok", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(os.path.join(root, "ok"))) == ["rank0.heap", "rank1.heap"]


@pytest.mark.parametrize("name", ["../x", "/x", "..", "a/b"])
def test_restore_and_export_refuse_a_bad_name_option(heap_dir, exported, name):
    heaps, job_dir = exported
    before = tree(heap_dir)
    one_line_error(cli("restore", job_dir, "--to", heap_dir, "-n", "1", "--name", name), "plain name")
    one_line_error(cli("export", heaps, "--to", heap_dir, "--name", name), "plain name")
    assert tree(heap_dir) == before


def test_a_failed_restore_removes_only_what_it_created(heap_dir, exported):
    _, job_dir = exported
    flip_block_byte(os.path.join(job_dir, "e2", "rank1.h5"))   # rank 1 of 2 reads the damaged block
    root = os.path.join(heap_dir, "root")
    mine = os.path.join(root, "j")
    os.makedirs(mine)
    with open(os.path.join(mine, "notes.txt"), "w") as f:   # the user's file in the target directory
        f.write("keep me")
    before = tree(heap_dir)
    out = cli("restore", job_dir, "--to", root, "-n", "2", "--capacity", "4MiB")
    one_line_error(out, "rank1.h5", "checksum")
    assert tree(heap_dir) == before
    fresh = os.path.join(heap_dir, "fresh", "deeper")         # created by the restore: removed again
    out = cli("restore", job_dir, "--to", fresh, "-n", "2", "--capacity", "4MiB")
    assert out.returncode == 1 and not os.path.exists(os.path.join(heap_dir, "fresh"))


def test_a_restore_stopped_by_sigterm_removes_its_heaps(heap_dir, exported):
    _, job_dir = exported
    root = os.path.join(heap_dir, "root")
    proc = subprocess.Popen([sys.executable, "-m", "hpcckpt", "restore", job_dir, "--to", root, "-n", "2000",
                             "--capacity", "1MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(root, "j", "rank3.heap")):   # waits for a condition, bounded
            assert proc.poll() is None and time.monotonic() < deadline, "restore ended before it was stopped"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "stopped by signal" in err and "Traceback" not in err, err
    assert not os.path.exists(root), tree(root)


@pytest.mark.parametrize("n", ["0", "-3", "65537", "100000"])
def test_restore_bounds_the_rank_count(heap_dir, exported, n):
    out = cli("restore", exported[1], "--to", heap_dir, "-n", n)
    assert out.returncode == 2 and "65536" in out.stderr and "Traceback" not in out.stderr


# -- export (item 5) ---------------------------------------------------------------------------------------
def test_heap_create_refuses_a_job_name_that_is_a_path(heap_path):
    for name in ("../victim", "a/b", "..", "/abs"):
        with pytest.raises(ValueError, match="plain name"):
            hpcckpt.Heap.create(heap_path, "1MiB", job=name)
    assert not os.path.exists(heap_path)


def test_export_writes_only_under_to_and_needs_a_name_for_a_nameless_heap(heap_dir):
    os.makedirs(os.path.join(heap_dir, "h"))
    with hpcckpt.Heap.create(os.path.join(heap_dir, "h", "rank0.heap"), "4MiB") as heap:   # job=''

        heap.array("u", 10)[:] = 1
        heap.checkpoint()
    to = os.path.join(heap_dir, "to")
    os.makedirs(os.path.join(to, "e0"))                    # an unrelated directory a cleanup must not touch
    before = tree(heap_dir)
    one_line_error(cli("export", os.path.join(heap_dir, "h"), "--to", to), "no job name", "--name")
    assert tree(heap_dir) == before
    out = cli("export", os.path.join(heap_dir, "h"), "--to", to, "--name", "mine")
    assert out.returncode == 0, out.stderr
    after = tree(heap_dir)
    assert all(p in after for p in before) and all(p in before or p.startswith("to/mine") for p in after), after


# -- info (item 12) ------------------------------------------------------------------------------------------
def test_info_of_an_export_with_a_missing_rank_file_says_so_and_fails(exported):
    _, job_dir = exported
    os.unlink(os.path.join(job_dir, "e2", "rank1.h5"))
    for target in (job_dir, os.path.join(job_dir, "e2.h5")):
        out = cli("info", target)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "missing e2/rank1.h5" in out.stdout and "missing e2/rank1.h5" in out.stderr
    out = cli("info", job_dir, "--json")
    assert out.returncode == 1 and json.loads(out.stdout)[0]["problem"].startswith("incomplete")


def test_info_export_dir_says_unverified_unless_checked_and_check_finds_damage(heap_dir, exported):
    heaps, job_dir = exported
    exports = os.path.dirname(job_dir)
    os.unlink(os.path.join(heaps, "rank1.heap"))                       # the job must come back from the export
    out = cli("info", heaps, "--export-dir", exports)
    assert out.returncode == 0, out.stderr
    assert "restarts at epoch 2 from the export (unverified" in out.stdout
    out = cli("info", heaps, "--export-dir", exports, "--check")
    assert out.returncode == 0 and "restarts at epoch 2 from the export (its checksums verified)" in out.stdout
    flip_block_byte(os.path.join(job_dir, "e2", "rank0.h5"))
    out = cli("info", heaps, "--export-dir", exports, "--check")
    assert out.returncode == 1 and "epoch 2 passed over: damaged" in out.stdout and "Traceback" not in out.stderr
    assert "restarts at epoch 2" not in out.stdout
    out = cli("info", job_dir, "--check")
    assert out.returncode == 1 and "damaged" in out.stdout


def test_info_words_epochs_one_way(heap_dir):
    make_job(os.path.join(heap_dir, "j"))
    os.makedirs(os.path.join(heap_dir, "e"))
    hpcckpt.Heap.create(os.path.join(heap_dir, "e", "rank0.heap"), "1MiB", job="e").close()   # nothing committed
    for target in ("j", "e"):
        out = cli("info", os.path.join(heap_dir, target)).stdout
        assert "None" not in out and " at 0" not in out and " at 2" not in out, out
    assert "rank 0 at epoch 2, rank 1 at epoch 2" in cli("info", os.path.join(heap_dir, "j")).stdout
    assert "rank 0/1, format" in cli("info", os.path.join(heap_dir, "e")).stdout
    assert ", empty {}" in cli("info", os.path.join(heap_dir, "e")).stdout


def test_the_damage_message_names_the_blocks_real_rows(exported):
    _, job_dir = exported
    flip_block_byte(os.path.join(job_dir, "e2", "rank0.h5"))
    out = cli("verify", job_dir)
    assert out.returncode == 1 and "rows 0..60 " in out.stderr, out.stderr
