"""``vggen.manifest``: the one reader of ``generated/manifest.json``, its
one-line errors, and the kernels it gives the runtime and the tools."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO
from vggen.errors import VggenError
from vggen.frontend import layers
from vggen.manifest import Manifest, load_manifest, read_manifest


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("text, message", [
    (None, "manifest.json not found: run `vggen build`"),
    ("{", "cannot read the manifest"),
    ("[]", "not a vggen manifest (no kernel list)"),
    ('{"kernels": {}}', "not a vggen manifest (no kernel list)"),
    ('{"kernels": [{"name": "k"}]}', "malformed kernel entry"),
    ('{"kernels": [{"name": "k", "layer": "ReLU", "direction": "forward", "signature": [3]}]}',
     "kernel k: cannot read argument 3"),
])
def test_a_missing_or_malformed_manifest_is_one_line(tmp_path, text, message):
    if text is not None:
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(VggenError) as e:
        read_manifest(tmp_path)
    assert message in _one_line(e)
    with pytest.raises(VggenError) as e:          # the raw view: the same reader, the same words
        load_manifest(tmp_path)
    assert message in _one_line(e)


def test_the_parsed_and_the_raw_view_are_one_file():
    manifest = read_manifest(REPO / "generated")
    assert isinstance(manifest, Manifest) and manifest.root == REPO / "generated"
    root, raw = load_manifest(REPO / "generated")
    assert root == manifest.root and raw == manifest.data
    assert [k.entry for k in manifest.kernels] == raw["kernels"] == manifest.entries
    assert {k.target for k in manifest.of_target("c")} == {"c"}


def test_kernels_for_a_layer_follow_its_direction():
    manifest = read_manifest(REPO / "generated")
    relu = layers.relu()
    forward = manifest.kernels_for("c", relu)
    assert forward and all(k.direction == "forward" and k.layer == "ReLU" for k in forward)
    from vggen.derive.autodiff import derive
    backward = manifest.kernels_for("c", derive(relu).program)
    assert backward and all(k.direction == "backward" for k in backward)
    assert json.loads((REPO / "generated" / "manifest.json").read_text())["kernels"] == manifest.entries
