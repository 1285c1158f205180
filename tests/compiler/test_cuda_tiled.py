"""The tiled CUDA schedule of the contractions (vggen/compiler/targets/cuda/schedule.py,
templates/cuda/contraction_tiled.cu.j2): which kernels get it and their GEMM
view, the arithmetic printed from the IR, the tiled/simple switch and what
the manifest records for the runtime, and the choice of tile configuration.

Correctness of the kernels is in test_cuda_emulation.py (on the CPU) and
test_cuda_compile.py (nvcc, registers; on a GPU where there is one).
"""

from __future__ import annotations

import json
import re

import pytest
import sympy as sp

from vggen.compiler.emit import TEMPLATE_DIR, build, generate, outputs
from vggen.compiler.ir import KernelClass
from vggen.compiler.pipeline import lower_network
from vggen.compiler.targets.cuda import schedule as cuda_schedule
from vggen.compiler.targets.cuda.printer import CudaPrinter
from vggen.compiler.targets.cuda.schedule import (
    CONFIGS,
    PERSISTENT_BLOCKS,
    choose,
    tiled_gemm,
)
from vggen.compiler.targets.cuda.target import SIMPLE_SUFFIX as CUDA_SIMPLE_SUFFIX
from vggen.compiler.targets.cuda.target import launch
from vggen.frontend.layers import convolution2d, linear, vgg_layers

SPECIALISE = {"K": 1, "S": 2, "epsilon": 2e-5}


@pytest.fixture(scope="module")
def vgg_cuda():
    return generate(vgg_layers(), "cuda")


def _by_name(kernels):
    return {k.name: k for k in kernels}


def test_the_contractions_are_tiled_and_nothing_else(vgg_cuda):
    _, kernels = vgg_cuda
    tiled = {k.name for k in kernels if k.tiled is not None}
    assert tiled == {f"{layer}_{d}" for layer in ("convolution2d", "linear")
                     for d in ("forward_y", "backward_g_x", "backward_g_w")}
    assert all(k.ir.cls is KernelClass.CONTRACTION for k in kernels if k.tiled is not None)
    assert all(k.tiled is None for k in kernels if k.ir.cls is not KernelClass.CONTRACTION)


def test_gemm_views():
    kernels = {k.name: k for k in lower_network([convolution2d(), linear(), convolution2d(2)], SPECIALISE)}
    want = {   # kernel: (m, n, k, A, B, A along, B along, A linear, B linear)
        "convolution2d_forward_y": ("oc", "b i j", "ic di dj", "w", "x", "k", "rows", True, False),
        "convolution2d_backward_g_x": ("ic", "b i j", "oc di dj", "w", "g_y", "k", "rows", False, False),
        "convolution2d_backward_g_w": ("oc", "ic di dj", "b i j", "g_y", "x", "k", "k", False, False),
        "linear_forward_y": ("b", "c", "ic", "x", "w", "k", "rows", True, True),
        "linear_backward_g_x": ("b", "ic", "c", "g_y", "w", "k", "k", True, True),
        "linear_backward_g_w": ("ic", "c", "b", "x", "g_y", "rows", "rows", True, True),
        "convolution2d_k_2_forward_y": ("oc", "b i j", "ic di dj", "w", "x", "k", "rows", True, False),
    }
    for name, (m, n, k, a, b, a_along, b_along, a_lin, b_lin) in want.items():
        g = tiled_gemm(kernels[name])
        got = (" ".join(g.names("m")), " ".join(g.names("n")), " ".join(g.names("k")), g.a.tensor, g.b.tensor,
               g.a.along, g.b.along, g.a.linear, g.b.linear)
        assert got == (m, n, k, a, b, a_along, b_along, a_lin, b_lin), name
    conv = tiled_gemm(kernels["convolution2d_forward_y"])
    IC, H, W = sp.symbols("IC H W", integer=True, positive=True)
    assert sp.simplify(conv.size("k") - 9 * IC) == 0
    assert isinstance(conv.b.expr, sp.Piecewise)              # x's zero padding: guards on B's element
    assert conv.a.flat0 == sp.sympify("9*IC*oc", locals={"IC": IC}) or str(conv.a.flat0) == "9*IC*oc"
    # 5×5: 25 window positions in k, B's guards over di, dj ∈ [−2, 2]
    k5 = tiled_gemm(kernels["convolution2d_k_2_forward_y"])
    assert str(k5.size("k")) == "25*IC" and [(str(lp.first), str(lp.last)) for lp in k5.k[1:]] == [("-2", "2")] * 2


def test_operands_and_values_are_printed_from_the_ir(vgg_cuda):
    _, kernels = vgg_cuda
    for k in kernels:
        if k.tiled is None:
            continue
        g, ir = k.tiled, k.ir
        p = CudaPrinter(ir.tensors, {**ir.ranges(), **g.ranges()})
        for op in (g.a, g.b):
            assert f"vg_v = {p.code(op.expr)};" in k.text, (k.name, op.name)   # the element, guards included
            if op.linear:
                assert p.code(op.flat0) in k.text and p.code(op.load) in k.text
        s = ir.stages[0]
        assert f"{p.code(s.store)} = {s.local};" in k.text and f"{s.local} = {p.code(s.value)};" in k.text
    # and the template names no tensor, index or size: everything comes through the printer
    text = (TEMPLATE_DIR / "cuda" / "contraction_tiled.cu.j2").read_text()
    for word in ("x[", "w[", "y[", "g_y", "IC", "OC", "oc", "ic", "di", "dj", "H", "W"):
        assert not re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", text), word


def test_tiled_kernels_keep_the_simple_schedule_as_a_fallback(vgg_cuda):
    _, kernels = vgg_cuda
    simple_text, simple = generate(vgg_layers(), "cuda", cuda_contraction="simple")
    simple = _by_name(simple)
    for k in kernels:
        if k.tiled is None:
            assert k.text == simple[k.name].text
            continue
        assert k.fallback == k.name + CUDA_SIMPLE_SUFFIX
        # the fallback is exactly the simple build's kernel, renamed
        old = simple[k.name].text
        renamed = old.replace(f"\n{k.name}(", f"\n{k.fallback}(").replace(f"// {k.name}:", f"// {k.fallback}:", 1)
        assert k.text.endswith(renamed)
        assert f'__launch_bounds__(VG_THREADS, VG_TILED_MIN_BLOCKS)\n{k.name}(' in k.text
        assert (f"vg_tune_{k.name} != 0 ? vg_tune_{k.name} : vg_tuned_{k.name}(vg_M, vg_N, vg_K)" in k.text
                and "vg_tile_choose(vg_M, vg_N, vg_K, (int)gridDim.x, vg_tune," in k.text)
    assert "vg_tile_choose" not in simple_text and "_simple(" not in simple_text
    with pytest.raises(ValueError):
        generate([linear()], "cuda", cuda_contraction="fast")


def test_the_manifest_says_how_to_launch_and_fall_back():
    tiled = json.loads(outputs()["manifest.json"])
    simple = json.loads(outputs(cuda_contraction="simple")["manifest.json"])
    assert tiled["cuda_contraction"] == "tiled" and simple["cuda_contraction"] == "simple"
    old = {e["name"]: e for e in simple["kernels"] if e["target"] == "cuda"}
    n = 0
    for e in tiled["kernels"]:
        if e["target"] != "cuda":
            continue
        assert e["signature"] == old[e["name"]]["signature"]      # the convention is unchanged
        if e["class"] != "contraction" or "algorithm" in e:     # a Winograd variant: its own launch
            assert "cuda_contraction" not in e and e["launch"] == old[e["name"]]["launch"]
            continue
        n += 1
        launch = e["launch"]
        assert e["cuda_contraction"] == "tiled" and old[e["name"]]["cuda_contraction"] == "simple"
        assert launch["mode"] == "tiled" and launch["block"] == [256, 1, 1] and launch["grid_any"] is True
        assert launch["grid"] == [str(PERSISTENT_BLOCKS), "1", "1"] and launch["dynamic_shared_bytes"] == 0
        assert launch["static_shared_bytes"] <= 48 * 1024
        assert launch["tune"]["symbol"] == f"vg_tune_{e['name']}"
        assert len(launch["configs"]) == len(CONFIGS) and launch["split_k"] is True
        assert launch["workspace"]["symbol"] == "vg_splitk_ws"
        assert e["fallback"] == {"name": e["name"] + CUDA_SIMPLE_SUFFIX, "launch": old[e["name"]]["launch"]}
        assert "fallback" not in old[e["name"]]
    assert n == 6


def test_build_switch(tmp_path):
    build(tmp_path / "s", cuda_contraction="simple")
    conv = (tmp_path / "s" / "cuda" / "convolution2d.cu").read_text()
    assert "vg_tile_choose" not in conv and "convolution2d_forward_y_simple" not in conv
    assert build(tmp_path / "s", check=True, cuda_contraction="simple") == []
    assert build(tmp_path / "s", check=True)                  # the default (tiled) differs


def test_without_split_k_there_is_no_atomic(monkeypatch):
    monkeypatch.setattr(cuda_schedule, "SPLIT_K", False)
    text, kernels = generate([convolution2d(), linear()], "cuda")
    assert "atomic" not in text and "vg_splitk_ws" not in text
    assert all(choose(M, N, K)[1] == 1 for M, N, K in ((64, 27, 65536), (512, 256, 4608)))
    assert all(e is None or not e.get("split_k") for e in [launch(k.ir, k.tiled) for k in kernels])


def test_choice():
    for M, N, K in ((64, 65536, 576), (64, 27, 65536), (512, 256, 4608), (512, 4608, 1024), (3, 1, 1), (1, 1, 100000)):
        c, s = choose(M, N, K)
        cfg = CONFIGS[c]
        steps = -(-K // cfg.bk)
        assert 1 <= s <= min(steps, cuda_schedule.MAX_SPLITS)
        assert s == 1 or cfg.split
        tiles = -(-M // cfg.bm) * -(-N // cfg.bn)
        assert s == 1 or tiles * s * cfg.bm * cfg.bn <= cuda_schedule.SPLITK_FLOATS
        # no split is empty: the last one starts before K
        per = -(-steps // s)
        assert (s - 1) * per < steps
    # small M×N with a long K (conv ∂L/∂w) splits K; a wide product does not
    assert choose(64, 576, 65536)[1] > 8 and choose(64, 65536, 576)[1] == 1
    # forcing: every config, splits clamped (128×128 never splits)
    for c in range(len(CONFIGS)):
        assert choose(512, 256, 4608, tune=cuda_schedule.tune_value(c, 4)) == (c, 1 if not CONFIGS[c].split else 4)
