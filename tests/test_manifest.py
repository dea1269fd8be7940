"""Crafted manifests: every value that decides what a restore reads is checked when the
manifest is read, so a bad one makes the export unusable with an ExportError naming the file,
never another exception later (which, on one rank, would leave the others waiting)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcckpt.manifest import ExportError, Manifest, _crc

BLOCK = {"rank": 1, "offset": [4, 0], "shape": [4, 3], "halo": [1, 1], "file": "e7/rank1.h5", "dataset": "u",
         "crc32c": 1374815403, "chunk_rows": 174762, "nchunks": 1, "chunks_crc32c": 130785270}
GOOD = Manifest(job="j", epoch=7, world_size=2, meta={"step": 70},
                objects={"u": {"kind": "array", "dtype": "'<f8'", "global_shape": [8, 3], "distributed": True,
                               "replicated": False, "element_shape": [], "blocks": [dict(BLOCK, rank=0, offset=[0, 0],
                                                                                      file="e7/rank0.h5"), BLOCK]}})


def signed(body: dict) -> str:
    """The manifest as a writer would have written it: well-formed JSON with a matching CRC."""
    body = {k: v for k, v in body.items() if k != "crc32c"}
    return json.dumps({**body, "crc32c": _crc(body)})


def test_the_good_manifest_reads():
    assert Manifest.from_json(GOOD.to_json(), "e7.json").objects["u"]["blocks"][1] == BLOCK


BAD = [None, -1, 0.5, float("inf"), float("nan"), "7", True, 1 << 70, [], {}, [-1], [1 << 40, 1 << 40]]


@pytest.mark.parametrize("key", ["rank", "shape", "offset", "halo", "crc32c", "chunk_rows", "nchunks", "chunks_crc32c",
                                 "file", "dataset"])
@pytest.mark.parametrize("value", BAD + [0, "../../etc/x", "/etc/passwd", "e7/../../x"])
def test_a_bad_block_value_is_an_export_error_naming_the_file(key, value):
    body = json.loads(GOOD.to_json())
    body["objects"]["u"]["blocks"][1][key] = value
    try:
        m = Manifest.from_json(signed(body), "/x/e7.json")
    except ExportError as e:
        assert str(e).startswith("/x/e7.json: ")
        return
    b = m.objects["u"]["blocks"][1]   # accepted: then it is a value a restore can use as it is
    assert type(b["rank"]) is int and 0 <= b["rank"] < 2 and type(b["chunk_rows"]) is int and b["chunk_rows"] >= 1
    assert isinstance(b["file"], str) and ".." not in b["file"].split("/") and not b["file"].startswith("/")


@pytest.mark.parametrize("key", ["epoch", "world_size"])
@pytest.mark.parametrize("value", BAD + [0])
def test_a_bad_epoch_or_world_size_is_an_export_error(key, value):
    body = json.loads(GOOD.to_json())
    body[key] = value
    with pytest.raises(ExportError, match="/x/e7.json: "):
        Manifest.from_json(signed(body), "/x/e7.json")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(path=st.lists(st.sampled_from(["objects", "u", "blocks", 0, 1, "rank", "shape", "file", "global_shape",
                                      "chunk_rows", "meta", "epoch", "dtype"]), min_size=1, max_size=5),
       value=json_values)
def test_any_crafted_value_reads_or_is_an_export_error(path, value):
    body = json.loads(GOOD.to_json())
    node = body
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict) != isinstance(path[-1], str):
        return
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        return
    try:
        Manifest.from_json(signed(body), "/x/e7.json")
    except ExportError:
        pass
