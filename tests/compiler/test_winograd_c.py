"""Winograd variants of 3×3 correlations: which kernels get them (the IR match),
what their C looks like, and that each equals its direct kernel on odd shapes,
forward, ∂L/∂x and ∂L/∂w, run through the runtime's public path."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp

from tests.helpers import REPO
from vggen.compiler.emit import generate
from vggen.compiler.passes.winograd import match
from vggen.compiler.pipeline import lower_network
from vggen.derive.autodiff import derive
from vggen.derive.winograd import FLOAT32_BOUND
from vggen.frontend import zoo
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices
from vggen.frontend.layers import IC, OC, B, H, W, convolution2d
from vggen.runtime.algorithms import ALGORITHMS, choose, predicted_ms
from vggen.runtime.winograd import direct_conv2d, direct_conv2d_weight_gradient

# (B, IC, OC, H, W): sizes that are no multiple of any tile, a 1×1 image, one channel,
# channel counts past a panel (8) and a lane block (32); more tiles than ∂L/∂w's chunk
# (VG_WT = 256) for both tile sizes, the last chunk a part
SHAPES = [(3, 5, 7, 9, 11), (1, 1, 1, 1, 1), (2, 3, 4, 6, 13), (1, 33, 9, 5, 3), (2, 8, 40, 4, 7),
          (6, 3, 4, 27, 26)]


def _kernels(layer):
    return {k.name: k for k in lower_network([layer], {"K": 1})}


# --------------------------------------------------------------------------- the match


def test_the_convolution_kernels_match_in_their_forms():
    ks = _kernels(convolution2d())
    assert match(ks["convolution2d_forward_y"]).form == "data"
    assert match(ks["convolution2d_backward_g_x"]).form == "data"
    assert match(ks["convolution2d_backward_g_w"]).form == "filter"


def test_the_input_gradient_reads_the_filter_turned_and_transposed():
    found = match(_kernels(convolution2d())["convolution2d_backward_g_x"])
    # tap (0, 0) of ∂L/∂x's filter is w[c, o, 1, 1]: the flip, and o, c swapped
    assert str(found.taps[0][0]) == "w[vg_wc, vg_wo, 1, 1]"
    assert str(found.taps[2][2]) == "w[vg_wc, vg_wo, -1, -1]"


@pytest.mark.parametrize("name", ["conv3x3_s2", "conv5x5_s2", "conv2x2_s2", "conv3x3_dilated"])
def test_other_windows_keep_their_direct_kernels(name):
    entry = zoo.ZOO[name]
    for k in lower_network([entry.layer()], entry.sizes):
        assert match(k) is None, k.name


def test_a_mutated_correlation_is_not_matched():
    """A coefficient in the summand, or a guard the zero padding does not explain."""
    k = _kernels(convolution2d())["convolution2d_forward_y"]
    r = k.stages[0].reductions[0]
    for term in (2 * r.term, r.term.xreplace({sp.Symbol("H", integer=True, positive=True): 5})):
        r_mut = type(r)(**{**r.__dict__, "term": term})
        stage = type(k.stages[0])(**{**k.stages[0].__dict__, "reductions": [r_mut]})
        mutated = type(k)(**{**k.__dict__, "stages": [stage]})
        assert match(mutated) is None


# --------------------------------------------------------------------------- the C


@pytest.fixture(scope="module")
def source():
    text, kernels = generate([convolution2d()], "c")
    return text, {g.name: g for g in kernels}


def test_each_convolution_kernel_has_two_winograd_variants(source):
    _, kernels = source
    for base in ("convolution2d_forward_y", "convolution2d_backward_g_x", "convolution2d_backward_g_w"):
        for m in (2, 4):
            g = kernels[f"{base}_winograd{m}"]
            assert g.algorithm["replaces"] == base and g.algorithm["tile"] == m
            assert [a.name for a in g.ir.args] == [a.name for a in kernels[base].ir.args]   # same signature


def test_variant_structure(source):
    """Transforms printed as functions over VG_NR lanes, the channel sums through the
    contractions' micro-kernel, the source equation in the comment."""
    text, kernels = source
    code = kernels["convolution2d_forward_y_winograd4"].text
    assert "//   y[b, oc, i, j] = Sum(w[oc, ic, di, dj]*x[b, ic, di + i, dj + j]" in code
    assert "F(4×4, 3×3) (points 0, 1, -1, 1/2, -2, ∞" in code
    # the transforms: functions of the file, one per algorithm and part, called by name
    for part in ("data", "filter", "output"):
        assert f"vg_winograd_f4x4_3x3_{part}(" in code and "static inline void" not in code
        assert text.count(f"static inline void vg_winograd_f4x4_3x3_{part}(") == 1
        assert text.count(f"static inline void vg_winograd_f3x3_4x4_{part}(") == 1      # ∂L/∂w's
    assert code.count("vg_tile_outer(") == 1 and "vg_gather(x + " in code and "vg_scatter(y + " in code
    # Bᵀ's first row for 0, ±1, ½, −2 is 2, 0, −3, −4... times d's column: the printed statement
    assert re.search(r"const float vg_y0_0 = 2\*vg_src\[0 \* vg_ss \+ vg_t\] - 3\*vg_src\[6 \* vg_ss", text)
    g_w = kernels["convolution2d_backward_g_w_winograd2"].text
    assert g_w.count("vg_tile_outer(") == 1 and "vg_k0 > 0);" in g_w      # Σ over tiles in k blocks, in order


def test_the_template_holds_no_arithmetic():
    """Numbers in the Winograd template are loop bounds and offsets of ±1 only:
    every coefficient comes printed from the transform matrices."""
    template = (REPO / "templates" / "c" / "winograd.c.j2").read_text()
    code = re.sub(r"\{#.*?#\}", "", template, flags=re.S)            # template comments
    code = re.sub(r"//[^\n]*|indent\(\d+(, true)?\)", "", code)         # C comments, layout
    literals = set(re.findall(r"(?<![\w.])\d+\.\d*f?|(?<![\w.])\d+(?![\w.])", code))
    assert literals <= {"0", "1", "2", "16", "0.0f"}, literals


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("algorithm", ["winograd2", "winograd4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_variants_equal_the_direct_kernels(c_backend, algorithm, shape):
    """Forward, ∂L/∂x and ∂L/∂w of the convolution run by the runtime with the
    algorithm forced, against the direct kernels and float64."""
    b, ic, oc, h, w = shape
    conv = convolution2d(1)
    sizes = {"B": b, "IC": ic, "OC": oc, "H": h, "W": w}
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((b, ic, h, w)).astype(np.float32)
    wt = rng.standard_normal((oc, ic, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((b, oc, h, w)).astype(np.float32)
    back = derive(conv).program
    results = {}
    for policy in ("direct", algorithm):
        c_backend.conv_algorithm = policy         # the programs are chosen again
        try:
            y = c_backend.run(conv, sizes, {"x": x, "w": wt})["y"]
            grads = c_backend.run(back, sizes, {"x": x, "w": wt, "g_y": gy})
        finally:
            c_backend.conv_algorithm = "auto"
        results[policy] = (y, grads["g_x"], grads["g_w"])
    ref = (direct_conv2d(x.astype(np.float64), wt.astype(np.float64)),
           direct_conv2d(gy.astype(np.float64), np.ascontiguousarray(wt[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
                         .astype(np.float64)),
           direct_conv2d_weight_gradient(x.astype(np.float64), gy.astype(np.float64)))
    bound = FLOAT32_BOUND[int(algorithm[-1])]      # the transforms' float32 error (vggen.derive.winograd)
    for got, direct, want, what in zip(results[algorithm], results["direct"], ref, ("y", "g_x", "g_w")):
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)) / scale < bound, what
        assert np.max(np.abs(got - direct)) / scale < bound, what


# --------------------------------------------------------------------------- the choice


def test_the_cost_model_picks_winograd_for_wide_layers_and_direct_for_the_image():
    wide = dict(B=64, C=64, O=64, H=32, W=32)
    assert min(ALGORITHMS, key=lambda a: predicted_ms("data", a, **wide)) == "winograd4"
    image = dict(B=64, C=3, O=64, H=32, W=32)
    assert min(ALGORITHMS, key=lambda a: predicted_ms("filter", a, **image)) == "direct"


def test_choose_takes_the_forced_then_the_recorded_then_the_model(c_backend):
    spec = next(s for s in c_backend.kernels if s.name == "convolution2d_forward_y")
    alts = c_backend.manifest.alternatives(spec)
    assert sorted(a.algorithm for a in alts) == ["winograd2", "winograd4"]
    sizes = {"B": 64, "H": 32, "IC": 64, "OC": 64, "W": 32}
    assert choose(spec, alts, sizes, "direct") is spec
    assert choose(spec, alts, sizes, "winograd2").algorithm == "winograd2"
    assert choose(spec, alts, sizes).algorithm == "winograd4"                 # the model
    recorded = type(spec)(**{**spec.__dict__, "entry": {**spec.entry, "measured": [
        {"sizes": sizes, "algorithm": "winograd2", "ms": {}}]}})
    assert choose(recorded, alts, sizes).algorithm == "winograd2"
    assert choose(recorded, alts, {**sizes, "B": 8}).algorithm == "winograd4"  # other sizes: the model
    assert choose(recorded, alts, sizes, measured_here=False).algorithm == "winograd4"   # another CPU's record


def test_records_of_another_cpu_are_replaced_not_merged():
    from vggen.compiler.measured import merge

    rec = {"sizes": {"B": 2}, "algorithm": "direct", "ms": {"direct": 1.0}}
    other = {"sizes": {"B": 4}, "algorithm": "winograd4", "ms": {"winograd4": 1.0}}
    old = {"device": "cpu A", "kernels": {"k": [rec]}}
    assert merge(old, "cpu A", {"k": [other]})["kernels"]["k"] == [rec, other]
    assert merge(old, "cpu B", {"k": [other]}) == {"device": "cpu B", "kernels": {"k": [other]}}


# --------------------------------------------------------------------------- a layout of one's own


def convolution_channels_last() -> Layer:
    """Not in VGG: a 3×3 convolution written channels last, weights HWIO."""

    b, oc, ic, i, j, di, dj = indices("b oc ic i j di dj")
    x = Tensor("x", (B, H, W, IC), Role.INPUT, zero_outside=True)
    w = Tensor("w", (3, 3, IC, OC), Role.PARAMETER, lower=(-1, -1, 0, 0))
    y = Tensor("y", (B, H, W, OC), Role.OUTPUT)
    return Layer("ConvolutionNHWC", [x, w, y], [Equation(
        y[b, i, j, oc], Sum(w[di, dj, ic, oc] * x[b, i + di, j + dj, ic], (ic, 0, IC), (di, -1, 2), (dj, -1, 2)),
        "channels last")])


def test_a_channels_last_convolution_is_matched_by_its_roles():
    found = {k.name: match(k) for k in lower_network([convolution_channels_last()], {})}
    assert {n: f.form for n, f in found.items()} == {"convolutionnhwc_forward_y": "data",
                                                      "convolutionnhwc_backward_g_x": "data",
                                                      "convolutionnhwc_backward_g_w": "filter"}
    fwd = found["convolutionnhwc_forward_y"]
    assert str(fwd.data) == "x[vg_wb, vg_wr, vg_ws, vg_wc]" and str(fwd.stores[0]) == "y[vg_wb, vg_wr, vg_ws, vg_wo]"
    assert str(fwd.taps[0][0]) == "w[-1, -1, vg_wc, vg_wo]"
    g_w = found["convolutionnhwc_backward_g_w"]
    assert str(g_w.gradient) == "g_y[vg_wb, vg_wr, vg_ws, vg_wo]" and str(g_w.stores[2][2]) == "g_w[1, 1, vg_wc, vg_wo]"


@pytest.mark.parametrize("algorithm", ["winograd2", "winograd4"])
def test_a_channels_last_convolution_runs_each_algorithm(algorithm):
    """Through vggen.compile, forward and backward with the algorithm forced,
    against direct and float64, on sizes no multiple of a tile."""
    import vggen

    op = vggen.compile(convolution_channels_last(), "c")
    rng = np.random.default_rng(4)
    b, ic, oc, h, w = 3, 5, 7, 9, 6
    x = rng.standard_normal((b, h, w, ic)).astype(np.float32)
    wt = rng.standard_normal((3, 3, ic, oc)).astype(np.float32)
    gy = rng.standard_normal((b, h, w, oc)).astype(np.float32)
    got = {}
    for policy in ("direct", algorithm):
        op.backend.conv_algorithm = policy
        y = op.forward(x=x, w=wt)["y"]
        grads = op.backward(x=x, w=wt, g_y=gy)
        got[policy] = (y, grads["g_x"], grads["g_w"])
    # float64, the NCHW reference on transposed arrays
    nchw = x.astype(np.float64).transpose(0, 3, 1, 2)
    oihw = wt.astype(np.float64).transpose(3, 2, 0, 1)
    g_nchw = gy.astype(np.float64).transpose(0, 3, 1, 2)
    want = (direct_conv2d(nchw, oihw).transpose(0, 2, 3, 1),
            direct_conv2d(g_nchw, np.ascontiguousarray(oihw[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))).transpose(0, 2, 3, 1),
            direct_conv2d_weight_gradient(nchw, g_nchw).transpose(2, 3, 1, 0))
    bound = FLOAT32_BOUND[int(algorithm[-1])]
    for mine, direct, ref, what in zip(got[algorithm], got["direct"], want, ("y", "g_x", "g_w")):
        scale = np.max(np.abs(ref))
        assert np.max(np.abs(mine - ref)) / scale < bound, what
        assert np.max(np.abs(direct - ref)) / scale < bound, what


@pytest.mark.parametrize("text", ['{"kernels": 3}', '[1, 2]', '{"kernels": {"k": 5}}', '{"kernels": {"k": [7]}}',
                                  '{"kernels": {"k": [{"sizes": 1, "algorithm": "direct"}]}}', "{not json"])
def test_a_malformed_record_file_is_one_line_naming_it(tmp_path, text):
    """algorithms.json or algorithms-cuda.json that is not a record: `vggen build`
    says which file, in one line, without a traceback."""
    import shutil
    import subprocess
    import sys

    from vggen.compiler.measured import RECORD_FILES

    gen = tmp_path / "generated"
    shutil.copytree(REPO / "generated", gen)
    for name in RECORD_FILES.values():
        (gen / name).write_text(text)
        res = subprocess.run([sys.executable, "-m", "vggen", "build", "--out", str(gen)],
                             capture_output=True, text=True)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert name in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
        (gen / name).unlink()
