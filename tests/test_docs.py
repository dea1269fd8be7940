"""The documentation builds from the docstrings with warnings as errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="the docs need sphinx (pip install '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", DOCS,
                           str(tmp_path / "html")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "html" / "api.html").read_text().count("restored_from") >= 1
