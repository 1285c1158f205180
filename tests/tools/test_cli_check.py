"""`vggen check`: every document equation proved; JSON and Markdown outputs;
`--layers zoo`: one row per zoo layer."""

import json
import logging
import subprocess
import sys

import pytest

from vggen.tools.cli import main
from vggen.tools.progress import LOGGER_NAME


def run(*args):
    return subprocess.run([sys.executable, "-m", "vggen", *args], capture_output=True, text=True)


def test_check_json_and_markdown(tmp_path):
    md = tmp_path / "derivations.md"
    res = run("check", "--json", "--markdown", str(md))
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    for row in rows:
        assert {"layer", "gradient", "equation", "method", "verdict"} <= set(row)
        assert row["verdict"] == "pass"
    winograd = [(r["gradient"], r["method"]) for r in rows if r["method"].startswith("winograd")]
    assert len(winograd) == 6 and {g for g, _ in winograd} == {"forward", "∂L/∂x", "∂L/∂w"}
    proved = {r["equation"] for r in rows if r["equation"]}
    assert proved == {"4", "8", "11", "14", "16", "18", "19", "20", "24", "25", "50", "53", "55"}
    sync_bn = {r["equation"] for r in rows if r["layer"] == "BatchNormalization (--sync-bn)"}
    assert sync_bn == {"19", "20", "24", "25", "50"}
    softmax = [r for r in rows if r["layer"] == "SoftmaxCrossEntropy"]
    assert softmax and softmax[0]["equation"] is None and softmax[0]["fd_error"] < 1e-6
    text = md.read_text()
    assert "## BatchNormalization" in text and "$$" in text and "eq. 50" in text


def test_bad_option_is_one_line_without_traceback():
    res = run("train", "--target", "tpu")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------- --layers zoo


@pytest.fixture
def small_zoo(monkeypatch):
    """A zoo of three, for speed: two layers that derive, and one whose backward
    applies a function outside the table (Γ′ = Γ·ψ)."""
    import sympy as sp

    from vggen.frontend import zoo
    from vggen.frontend.layers import elementwise_activation

    entries = {"tanh": zoo.ZOO["tanh"], "upsample2x": zoo.ZOO["upsample2x"],
               "gamma": zoo.ZooEntry(lambda: elementwise_activation("Gamma", sp.gamma), "torch.lgamma(x).exp()")}
    monkeypatch.setattr(zoo, "ZOO", entries)
    logger = logging.getLogger(LOGGER_NAME)          # main() sets the vggen logger up: give it back
    level, handlers = logger.level, list(logger.handlers)
    yield entries
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_check_layers_zoo_lists_one_row_per_layer(small_zoo, capsys):
    assert main(["check", "--layers", "zoo"]) == 1                     # one layer fails
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["zoo", "layer", "gradients", "backward", "eqs", "gather", "finite", "diff.",
                                "verdict", "detail"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert list(rows) == ["tanh", "upsample2x", "gamma"]
    assert rows["tanh"].split()[1:5] == ["Tanh", "∂L/∂x", "1", "yes"] and rows["tanh"].rstrip().endswith("pass")
    assert rows["upsample2x"].split()[1:5] == ["Upsample2", "∂L/∂x", "1", "yes"]
    assert " fail " in rows["gamma"] and "has no C/CUDA form" in rows["gamma"]
    assert lines[-1] == "2 derived and checked, 1 failed"


def test_check_layers_zoo_as_json_and_the_options_it_refuses(small_zoo, capsys):
    assert main(["check", "--layers", "zoo", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["verdict"]) for r in rows] == [("tanh", "pass"), ("upsample2x", "pass"), ("gamma", "fail")]
    assert rows[0]["gradients"] == ["∂L/∂x"] and rows[0]["fd_error"] < 1e-6 and rows[0]["gather"] is True
    assert main(["check", "--layers", "zoo", "--markdown", "x.md"]) == 2
    assert capsys.readouterr().err == ("vggen: error: --markdown writes the document's derivations: "
                                       "it goes with --layers vgg, not zoo\n")
    with pytest.raises(SystemExit):
        main(["check", "--layers", "resnet"])
    assert "argument --layers: invalid choice: 'resnet'" in capsys.readouterr().err


def test_check_help_says_what_each_layer_set_checks(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--layers {vgg,zoo}" in help_text
    assert "vgg (default): VGG's layers" in help_text and "zoo: the layers of vggen/frontend/zoo.py" in help_text
