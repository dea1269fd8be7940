"""The C core can be linked into a program beside PMDK: it exports only names with its own
module prefixes, none of libpmem's (pmem_*) or libpmemobj's (pmemobj_*)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native")
PREFIXES = ("heap_", "ckpt_", "crc_", "alias_", "alloc_", "state_", "track_", "persist_", "vec_", "delta_", "par_", "hk_")


def test_the_core_exports_only_its_own_prefixes_and_nothing_of_libpmem(tmp_path):
    if not shutil.which("cc") or not shutil.which("nm"):
        pytest.skip("needs a C compiler and nm")
    exported = set()
    for name in sorted(os.listdir(NATIVE)):
        if name.endswith(".c"):
            obj = tmp_path / (name + ".o")
            subprocess.run(["cc", "-c", "-O1", "-std=gnu11", f"-I{NATIVE}", f"-I{NATIVE}/include",
                            os.path.join(NATIVE, name), "-o", str(obj)], check=True)
            out = subprocess.run(["nm", "-g", "--defined-only", str(obj)], capture_output=True, text=True,
                                 check=True).stdout
            exported |= {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported and not [s for s in exported if s.startswith("pmem")], sorted(exported)
    assert not [s for s in exported if not s.startswith(PREFIXES)], sorted(exported)
