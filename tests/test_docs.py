"""The documentation builds from the docstrings with warnings as errors, and holds the entries
a user looks for (issue 24, items 6 to 9)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    """The built HTML pages, by name (built once for the module)."""
    pytest.importorskip("sphinx", reason="the docs need sphinx (pip install '.[test]')")
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", DOCS, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {p.stem: p.read_text() for p in out.glob("*.html")}


def text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page)).replace("&quot;", '"').replace("&#8217;", "'")


def test_docs_build_without_warnings(html):
    assert {"index", "guide", "porting", "api"} <= set(html)


@pytest.mark.parametrize("entry", [
    "hpcckpt.open", "hpcckpt.JobHeap.export", "hpcckpt.export.ExportHandle", "hpcckpt.export.ExportHandle.wait",
    "hpcckpt.Heap", "hpcckpt.Heap.create", "hpcckpt.Heap.open", "hpcckpt.Heap.restored",
    "hpcckpt.Heap.restored_from", "hpcckpt.Heap.table", "hpcckpt.Pool", "hpcckpt.table.Table",
    "hpcckpt.table.Table.append", "the-dict-like-interface"])
def test_the_api_reference_has_the_entry(html, entry):
    assert f'id="{entry}"' in html["api"]


def test_the_api_reference_shows_the_dict_like_interface_and_no_internal_constructor(html):
    api = text(html["api"])
    for expr in ("heap[name]", "name in heap", "del heap[name]", "len(heap)", "for name in heap"):
        assert expr in api, expr
    assert "native, path, tracker" not in api and "__init__" not in api
    assert 'restored_from: str | None' in api and '"partner"' in api


def test_the_guide_has_the_partner_level_in_the_restart_decision_and_says_where_files_go(html):
    guide = text(html["guide"])
    decision = guide[guide.index("The restart decision"):guide.index("Looking at a running job")]
    assert "partner" in decision and '"local", "partner", "export", or None' in decision
    assert "Where files go" in guide and "/scratch" not in guide


def test_the_porting_guide_covers_grids_meta_and_another_rank_count(html):
    porting = text(html["porting"])
    for words in ("halo=(1, 0)", "exchange the halo at the start of a step", "heap.meta", "replicated=True",
                  "After a restart on another number of ranks", "A table whose length changes", "export_dir"):
        assert words in porting, words


@pytest.mark.parametrize("words", ["MPI_Abort", "HPCCKPT_TIMEOUT", "abort_on_error=False", "fresh=True",
                                   "One job name, one running job"])
def test_the_guide_says_how_a_job_fails_well(html, words):
    assert words in text(html["guide"])


@pytest.mark.parametrize("words", ["route=owner", "parts.remove(gone)", "edge ghosts from the export",
                                   "examples/particles.py"])
def test_the_porting_page_shows_tables_and_what_the_export_keeps_of_ghosts(html, words):
    assert words in text(html["porting"])
