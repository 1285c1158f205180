"""`vggen inspect` (vggen.tools.inspect), `vggen plot` (vggen.tools.plot) and the new subcommands' help."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import sympy as sp

from tests.helpers import REPO
from vggen.compiler.emit import generate
from vggen.errors import VggenError
from vggen.frontend.layers import elementwise_activation, relu
from vggen.manifest import load_manifest
from vggen.tools.cli import main, parser
from vggen.tools.inspect import find_layer, inspect_layer, kernel_text
from vggen.tools.plot import load_metrics

GENERATED = REPO / "generated"


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vggen", *args], capture_output=True, text=True, cwd=cwd)


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("name, layer", [
    ("conv", "Convolution2D"), ("Convolution2D", "Convolution2D"), ("CONVOLUTION2d", "Convolution2D"),
    ("relu", "ReLU"), ("ReLU", "ReLU"), ("batch_norm", "BatchNormalization"), ("bn", None),
    ("max-pool", "MaxPooling2D"), ("pool", "MaxPooling2D"), ("soft", "SoftmaxCrossEntropy"),
    ("lin", "Linear"), ("drop", "Dropout"), ("nope", None), ("", None),
])
def test_find_layer(name, layer):
    if layer is None:
        with pytest.raises(VggenError) as e:
            find_layer(name)
        assert "the layers are: Convolution2D, Linear, Dropout, BatchNormalization, ReLU, MaxPooling2D, " \
               "SoftmaxCrossEntropy" in str(e.value)
    else:
        assert find_layer(name).name == layer


def test_find_layer_exact_name_beats_prefix_and_ambiguity_is_refused():
    layers = [relu(), elementwise_activation("ReLU6", lambda v: sp.Min(sp.Max(v, 0), 6))]
    assert find_layer("relu", layers).name == "ReLU" and find_layer("relu6", layers).name == "ReLU6"
    with pytest.raises(VggenError, match="ambiguous: it could be ReLU, ReLU6"):
        find_layer("re", layers)


def test_inspect_shows_equations_and_the_generated_kernels():
    text = inspect_layer("relu", "c", GENERATED)
    fwd, bwd, kernels = (text.index(s) for s in ("Forward equations:", "Derived backward equations",
                                                  "Generated C kernels"))
    assert fwd < bwd < kernels
    assert "y[b, c, i, j] = Piecewise((x[b, c, i, j], x[b, c, i, j] >= 0), (0, True))  " \
           "(eq. 51; kernel relu_forward_y)" in text
    assert "g_x[b, c, i, j] = Piecewise((1, x[b, c, i, j] >= 0), (0, True))*g_y[b, c, i, j]  " \
           "(document: eq. 53; kernel relu_backward_g_x)" in text
    # the kernels' text is exactly what the generator emits for them, and nothing else
    _, emitted = generate([relu()], "c")
    for k in emitted:
        assert k.text in text
    assert text.count("void ") == len(emitted) == 2 and "#include" not in text and "dropout" not in text

    cuda = inspect_layer("conv", "cuda", GENERATED)
    for name in ("convolution2d_forward_y", "convolution2d_backward_g_x", "convolution2d_backward_g_w"):
        assert f"\n{name}(" in cuda
    # each tiled contraction's text holds its <name>_simple fallback too (vggen.compiler.emit);
    # then its two Winograd variants
    # and the Winograd transforms they call, once each
    assert cuda.count("static __device__ __forceinline__ void vg_winograd_f4x4_3x3_data(") == 1
    assert cuda.count("static __device__ __forceinline__ void vg_winograd_") == 12
    assert cuda.count("__global__") == 3 * (2 + 2) and "(document: eq. 4, 8; kernel convolution2d_backward_g_x, " in cuda


def test_kernel_text_is_sliced_to_its_own_body():
    root, manifest = load_manifest(GENERATED)
    for e in manifest["kernels"]:
        text = kernel_text(root, e)          # checks the manifest's sha256
        assert text.startswith(f"// {e['name']}: ") and text.rstrip().endswith("}") and "\n\n" not in text


def test_inspect_refuses_a_stale_generated_directory(tmp_path):
    gen = tmp_path / "generated"
    shutil.copytree(GENERATED, gen)
    relu_cu = gen / "cuda" / "relu.cu"
    relu_cu.write_text(relu_cu.read_text().replace("= v_y;", "= 2 * v_y;"))
    with pytest.raises(VggenError, match="relu_forward_y differs from the manifest's hash.*vggen build"):
        inspect_layer("relu", "cuda", gen)
    relu_cu.write_text("// nothing\n")
    with pytest.raises(VggenError, match="has no kernel relu_forward_y.*vggen build"):
        inspect_layer("relu", "cuda", gen)
    relu_cu.unlink()
    with pytest.raises(VggenError, match="relu.cu: cannot read"):
        inspect_layer("relu", "cuda", gen)
    assert "relu_forward_y" in inspect_layer("relu", "c", gen)     # the C file is still current


def test_cli_inspect():
    res = run("inspect", "MaxPooling2D", "--target", "cuda")
    assert res.returncode == 0, res.stderr
    assert "maxpooling2d_backward_g_x(" in res.stdout and "Derived backward equations" in res.stdout
    res = run("inspect", "softmaxx")
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    assert "no layer named 'softmaxx'; the layers are: Convolution2D" in res.stderr


# --------------------------------------------------------------------------- plot


def _rows(n):
    return [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e, "test_loss": 2.2 / e,
             "test_acc": 0.9 - 0.5 / e, "images_per_s": 900.0, "seconds": 1.5} for e in range(1, n + 1)]


def _write(path, rows, extra=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def test_load_metrics(tmp_path):
    rows = _rows(4)
    # a resumed run appended epochs 3-4 again: the last line of an epoch wins; blank lines are skipped
    again = [dict(r, train_loss=r["train_loss"] / 2) for r in rows[2:]]
    path = _write(tmp_path / "m.jsonl", rows + again, "\n")
    loaded = load_metrics(path)
    assert [r["epoch"] for r in loaded] == [1, 2, 3, 4] and loaded[2:] == again
    assert load_metrics(_write(tmp_path / "only.jsonl", [{"epoch": 1, "train_loss": 1.0}])) == \
        [{"epoch": 1, "train_loss": 1.0}]


@pytest.mark.parametrize("text, message", [
    ("", r"x\.jsonl: the metrics file is empty"),
    ("\n\n", r"x\.jsonl: the metrics file is empty"),
    ('{"epoch": 1, "train_loss": 1}\n{"epoch": 2, "train_loss"\n', r"x\.jsonl, line 2: not JSON"),
    ('[1, 2]\n', r"x\.jsonl, line 1: expected a JSON object"),
    ('{"train_loss": 1}\n', r"x\.jsonl, line 1: missing epoch"),
    ('{"epoch": 1, "train_loss": "low"}\n', r"x\.jsonl, line 1: train_loss must be a number"),
    ('{"epoch": 1.5, "train_loss": 1}\n', r"x\.jsonl, line 1: epoch must be a whole number"),
])
def test_bad_metrics_name_the_file_and_line(tmp_path, text, message):
    (tmp_path / "x.jsonl").write_text(text)
    with pytest.raises(VggenError, match=message):
        load_metrics(tmp_path / "x.jsonl")


def test_missing_metrics_file(tmp_path):
    with pytest.raises(VggenError, match="no.jsonl: no such metrics file"):
        load_metrics(tmp_path / "no.jsonl")


def test_plot_writes_a_png_atomically(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    metrics = _write(tmp_path / "metrics.jsonl", _rows(6))
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    assert main(["plot", str(metrics), "-o", str(out), "--title", "digits"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.shape[0] == 400 and image.shape[1] == 1000       # 10 × 4 inches at 100 dpi
    assert image[..., :3].std() > 0.05                             # something is drawn
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.jsonl"]
    # test metrics absent (a run without a test set): train curves only
    only_train = _write(tmp_path / "t.jsonl", [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)])
    assert main(["plot", str(only_train), "-o", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    metrics = _write(tmp_path / "m.jsonl", _rows(2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib → ImportError
    assert main(["plot", str(metrics), "-o", str(tmp_path / "c.png")]) == 2
    assert "pip install 'vggen[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_cli_plot_bad_file_is_one_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 1, "train_loss": 1}\nnot json\n')
    res = run("plot", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "c.png"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    assert "m.jsonl, line 2: not JSON" in res.stderr and not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["report", "inspect", "plot"])
def test_help_describes_every_option(command):
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    assert p.description and sub._choices_actions and \
        next(a for a in sub._choices_actions if a.dest == command).help
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
        for opt in action.option_strings or [action.metavar or action.dest]:
            assert opt in text
