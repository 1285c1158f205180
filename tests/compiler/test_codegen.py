"""Tests for kernel generation (vggen.compiler.pipeline, the targets' printers and schedules, vggen.compiler.emit).

The generated C is compiled with ``cc -O2 -fopenmp -shared -fPIC``, loaded
with ctypes and every kernel is compared with the NumPy evaluator (the
reference semantics of the equations) on random float32 data of odd shapes;
then structure (no atomics, one store per element, simd on the contiguous
loop, source equations in comments), reproducibility and staleness checks of
``build``, and the analysis pass's refusals.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import (
    CC,
    REPO,
    call_c,
    check_layer_kernels,
    compile_c,
    layer_data,
    leaky_relu,
    needs_cc,
    row_logsumexp,
)
from vggen.compiler.emit import (
    VGG_SPECIALISE,
    build,
    generate,
    generated_layers,
    outputs,
)
from vggen.compiler.ir import KernelClass
from vggen.compiler.pipeline import lower, lower_layer
from vggen.compiler.targets.cuda import mapping as cuda_mapping
from vggen.errors import VggenError
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices
from vggen.frontend.layers import (
    IC,
    B,
    C,
    W,
    batch_normalization,
    convolution2d,
    linear,
    max_pooling2d,
    network_layers,
    vgg_layers,
)


@pytest.fixture(scope="module")
def vgg_c():
    text, kernels = generate(network_layers(), "c")
    return text, kernels


@pytest.fixture(scope="module")
def vgg_cuda():
    return generate(vgg_layers(), "cuda")


@pytest.fixture(scope="module")
def vgg_lib(vgg_c, tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler")
    return compile_c(vgg_c[0], tmp_path_factory.mktemp("vgg_c"))


def kernel(kernels, name):
    (k,) = [k for k in kernels if k.name == name]
    return k


# --------------------------------------------------------------------------- numerics

ODD_SHAPES = [
    dict(B=1, C=3, IC=3, OC=5, H=5, W=7, HO=2, WO=3),
    dict(B=3, C=5, IC=5, OC=3, H=7, W=5, HO=3, WO=1),
]


@needs_cc
@pytest.mark.parametrize("sizes", ODD_SHAPES, ids=["B1", "B3"])
def test_every_vgg_kernel_matches_the_reference(vgg_c, vgg_lib, sizes):
    _, kernels = vgg_c
    checked = []
    for n, layer in enumerate(network_layers()):
        checked += check_layer_kernels(vgg_lib, kernels, layer, sizes, seed=n)
    assert sorted(checked) == sorted(k.name for k in kernels)


@needs_cc
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), c=st.integers(1, 4), ic=st.integers(1, 4), oc=st.integers(1, 4),
       h=st.integers(1, 6), w=st.integers(1, 6), ho=st.integers(1, 3), wo=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_vgg_kernels_match_on_any_shape(vgg_c, vgg_lib, b, c, ic, oc, h, w, ho, wo, seed):
    _, kernels = vgg_c
    sizes = dict(B=b, C=c, IC=ic, OC=oc, H=h, W=w, HO=ho, WO=wo)
    for n, layer in enumerate(network_layers()):
        check_layer_kernels(vgg_lib, kernels, layer, sizes, seed=seed + n)


# Shapes that take the contraction kernels' matrix-product schedule (contraction.c.j2,
# _gemm.c.j2) through its blocks and edges: several n blocks and k blocks, register
# tiles cut by m, n and k, runs along the packing loops at least VG_RUN long and
# shorter ones gathered through the column tables, ∂L/∂w in both forms (inner, k in
# several slices) and Linear's ∂L/∂x in both.
GEMM_SHAPES = [
    ("conv", dict(B=2, IC=30, OC=11, H=19, W=18)),     # 2 k blocks, 2+ n blocks; ∂L/∂w inner, 3 n blocks
    ("conv", dict(B=3, IC=5, OC=7, H=3, W=4)),         # runs of 12 < VG_RUN: gathered
    ("conv", dict(B=3, IC=2, OC=2, H=29, W=27)),       # ∂L/∂w inner, k in 3 slices
    ("conv", dict(B=1, IC=4, OC=5, H=2, W=3)),         # ∂L/∂w outer (k ≤ VG_INNER·m)
    ("linear", dict(B=3, IC=300, C=37)),               # y: 2 k blocks; ∂L/∂x inner
    ("linear", dict(B=70, IC=20, C=20)),               # ∂L/∂x outer
]


def gemm_forms(text: str, what: str, sizes: dict) -> set:
    """Which forms (inner / outer) the shape's inner-capable kernel takes at run time."""
    inner = int(re.search(r"VG_INNER = (\d+)", text).group(1))
    m, k = (sizes["OC"], sizes["B"] * sizes["H"] * sizes["W"]) if what == "conv" else (sizes["B"], sizes["C"])
    return {"inner" if k > inner * m else "outer"}


@needs_cc
@pytest.mark.parametrize("flags", [("-O2",), ("-O3", "-march=native")], ids=["O2", "native"])
def test_matrix_product_schedule_matches_the_reference(vgg_c, tmp_path, flags):
    """Blocks, tile edges, both packing paths and both forms; with -march=native
    the vectorised (and, on AVX-512, intrinsic) micro-kernels too."""
    text, kernels = vgg_c
    try:
        lib = compile_c(text, tmp_path, flags=flags)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"{' '.join(flags)} not supported here: {e.stderr[:200]}")
    forms = set()
    for n, (what, sizes) in enumerate(GEMM_SHAPES):
        layer = convolution2d() if what == "conv" else linear()
        checked = check_layer_kernels(lib, kernels, layer, sizes, seed=n)
        assert len(checked) == (9 if what == "conv" else 3)       # a conv's kernels with their Winograd variants
        forms |= {(what, f) for f in gemm_forms(text, what, sizes)}
    assert forms == {(w, f) for w in ("conv", "linear") for f in ("inner", "outer")}


@needs_cc
def test_matrix_products_do_not_depend_on_the_thread_count(vgg_c, vgg_lib):
    """Blocks are cut by the sizes alone (k slices summed in order), so every
    output is bit for bit the same however many threads share the work."""
    _, kernels = vgg_c
    set_threads = getattr(vgg_lib, "omp_set_num_threads", None)
    get_threads = getattr(vgg_lib, "omp_get_max_threads", None)
    if set_threads is None or get_threads is None:
        pytest.skip("no OpenMP runtime to set the thread count of")
    before = get_threads()
    try:
        for n, (what, sizes) in enumerate(GEMM_SHAPES[:4:2]):
            layer = convolution2d()
            env = layer_data(layer, sizes, VGG_SPECIALISE, np.random.default_rng(n))
            runs = []
            for threads in (1, 2, 3):
                set_threads(threads)
                runs.append({gk.name: call_c(vgg_lib, gk, env, sizes) for gk in kernels if gk.ir.layer == layer.name})
            for other in runs[1:]:
                for name, outs in runs[0].items():
                    for t, arr in outs.items():
                        assert np.array_equal(arr, other[name][t]), (name, t)
    finally:
        set_threads(before)


@needs_cc
def test_layers_outside_vgg_use_the_same_templates(tmp_path):
    layers = [convolution2d(2), leaky_relu(), max_pooling2d(3), row_logsumexp()]
    text, kernels = generate(layers, "c")
    lib = compile_c(text, tmp_path)
    names = {k.name for k in kernels}
    assert {"convolution2d_k_2_forward_y", "convolution2d_k_2_backward_g_x", "convolution2d_k_2_backward_g_w",
            "leakyrelu_forward_y", "leakyrelu_backward_g_x", "maxpooling2d_s_3_forward_sel_y"} <= names
    conv = kernel(kernels, "convolution2d_k_2_forward_y")
    # the 5×5 window is part of the matrix product's k, read with constant strides
    assert "const int vg_K = 25*IC;    // k = (ic, di, dj)" in conv.text
    assert "w[25*IC*oc + 5*di + dj + 25*ic + 12]" in conv.text
    rows = kernel(kernels, "rowlogsumexp_forward_mx_y").ir
    assert rows.cls is KernelClass.ROW_SOFTMAX and cuda_mapping.schedule(rows).mode == "thread"
    for sizes in (dict(B=2, C=3, IC=3, OC=2, H=6, W=5, HO=2, WO=3), dict(B=1, C=2, IC=2, OC=3, H=3, W=2, HO=1, WO=1)):
        checked = []
        for n, layer in enumerate(layers):
            checked += check_layer_kernels(lib, kernels, layer, sizes, seed=n)
        assert sorted(checked) == sorted(names)


def batched_matmul():
    """A contraction that is no single matrix product: both operands read b."""
    b, c, k, n = indices("b c k n")
    a = Tensor("a", (B, C, IC), Role.INPUT)
    bb = Tensor("bb", (B, IC, W), Role.INPUT)
    y = Tensor("y", (B, C, W), Role.OUTPUT)
    return Layer("BatchedMatMul", [a, bb, y], [Equation(y[b, c, n], Sum(a[b, c, k] * bb[b, k, n], (k, 0, IC)))])


@needs_cc
def test_contraction_with_a_batch_index_keeps_the_row_schedule(tmp_path):
    """A batch index (read by both operands) rules out the matrix-product form:
    the row / reduce loops are the fallback, from the same template."""
    layer = batched_matmul()
    text, kernels = generate([layer], "c")
    assert {k.ir.cls for k in kernels} == {KernelClass.CONTRACTION}
    assert all(k.schedule.gemm is None and "vg_tile" not in k.text for k in kernels)
    lib = compile_c(text, tmp_path)
    for sizes in (dict(B=2, C=3, IC=5, W=4), dict(B=1, C=1, IC=2, W=7)):
        assert len(check_layer_kernels(lib, kernels, layer, sizes)) == 3


@needs_cc
def test_window_size_left_symbolic_becomes_a_runtime_argument(tmp_path):
    """Without K specialised, the window is a loop and K an int argument."""
    layer = convolution2d()
    text, kernels = generate([layer], "c", specialise={})
    fwd = kernel(kernels, "convolution2d_forward_y")
    assert [a.name for a in fwd.ir.args][-6:] == ["B", "H", "IC", "K", "OC", "W"]
    lib = compile_c(text, tmp_path)
    sizes = dict(B=2, IC=3, OC=2, H=5, W=4, K=2)
    spec = {"K": 2}
    check_layer_kernels(lib, kernels, layer, sizes, specialise=spec)


# --------------------------------------------------------------------------- classes and structure


def test_kernel_classes(vgg_c):
    _, kernels = vgg_c
    cls = {k.name: k.ir.cls for k in kernels
           if not k.name.startswith("batchnormalization_relu") and k.algorithm is None}
    assert cls == {
        "convolution2d_forward_y": KernelClass.CONTRACTION,
        "convolution2d_backward_g_x": KernelClass.CONTRACTION,
        "convolution2d_backward_g_w": KernelClass.CONTRACTION,
        "linear_forward_y": KernelClass.CONTRACTION,
        "linear_backward_g_x": KernelClass.CONTRACTION,
        "linear_backward_g_w": KernelClass.CONTRACTION,
        "dropout_forward_y": KernelClass.ELEMENTWISE,
        "dropout_backward_g_x": KernelClass.ELEMENTWISE,
        "batchnormalization_forward_mu_var": KernelClass.REDUCTION,
        "batchnormalization_forward_xhat_y": KernelClass.ELEMENTWISE,
        "batchnormalization_backward_g_gamma_g_beta": KernelClass.REDUCTION,
        "batchnormalization_backward_g_x": KernelClass.ELEMENTWISE,
        "relu_forward_y": KernelClass.ELEMENTWISE,
        "relu_backward_g_x": KernelClass.ELEMENTWISE,
        "maxpooling2d_forward_sel_y": KernelClass.WINDOW_ARGMAX,
        "maxpooling2d_backward_g_x": KernelClass.ELEMENTWISE,
        "softmaxcrossentropy_forward_m_s_l": KernelClass.ROW_SOFTMAX,
        "softmaxcrossentropy_backward_g_x": KernelClass.ELEMENTWISE,
    }


def test_single_equation_lowering_and_signature():
    layer = convolution2d()
    k = lower(layer.equations[0], layer, {"K": 1})
    assert k.name == "convolution2d_forward_y" and k.cls is KernelClass.CONTRACTION
    assert [a.name for a in k.args] == ["w", "x", "y", "B", "H", "IC", "OC", "W"]
    assert [a.access for a in k.args] == ["read"] * 2 + ["write"] + ["size"] * 5
    assert [str(s) for s in k.args[0].tensor.shape] == ["OC", "IC", "3", "3"]
    (r,) = k.reductions
    assert [lp.var.name for lp in r.loops] == ["ic"]          # di, dj unrolled
    assert len(sp.Add.make_args(r.body)) == 9
    assert {op[0].name for op in k.operands} == {"w", "x"}
    assert k.guards                                             # zero padding became range guards


def test_maxpool_selection_is_fused_into_the_argmax(vgg_c):
    _, kernels = vgg_c
    k = kernel(kernels, "maxpooling2d_forward_sel_y")
    sel, y = k.ir.stages
    (r,) = sel.reductions
    assert r.op == "argmax" and y.value == r.best               # y is the maximum itself
    assert [p for p, _ in r.positions] == [0, 1, 2, 3]


# the only atomics of the CUDA kernels: int tickets, of a tiled kernel's split-K and of a split
# reduction (no float atomics)
SPLIT_K_TICKET = "atomicAdd(&vg_splitk_count[vg_tile], 1u)"
SPLIT_REDUCTION_TICKET = re.compile(r"atomicAdd\(&vg_rcount_\w+\[vg_o\], 1u\)")


def test_conv_input_gradient_is_a_gather_writing_each_element_once(vgg_c, vgg_cuda):
    cuda = kernel(vgg_cuda[1], "convolution2d_backward_g_x")
    for text, schedules in ((kernel(vgg_c[1], "convolution2d_backward_g_x").text, 1), (cuda.text, 2)):
        assert set(re.findall(r"atomic\w*\([^)]*\)", text)) <= {SPLIT_K_TICKET}
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
        # one store, per output element, in each schedule (CUDA: the tiled kernel and its _simple fallback)
        assert len(re.findall(r"\bg_x\[[^\]]*\] =", code)) == schedules
    k = cuda.ir
    assert cuda.schedule.mode == "thread"                       # simple schedule: one thread per output element
    assert tuple(k.stages[0].store.indices) == tuple(lp.var for lp in k.parallel)
    atomics = set(re.findall(r"atomic\w*\([^)]*\)", vgg_cuda[0]))
    assert SPLIT_K_TICKET in atomics
    assert all(a == SPLIT_K_TICKET or SPLIT_REDUCTION_TICKET.fullmatch(a) for a in atomics), atomics


def test_c_contraction_is_a_register_tiled_matrix_product(vgg_c):
    text, kernels = vgg_c
    # the arithmetic: a micro-kernel whose innermost loop is a simd loop over a tile of
    # accumulators, with no per-element branch (the guards went into the packing)
    tile = text[text.index("static inline void vg_tile_outer"):]
    lines = tile[:tile.index("\n}\n")].splitlines()
    (at,) = [n for n, line in enumerate(lines) if "acc[mr][nr] += vg_a * b[" in line]
    assert lines[at - 1].strip() == "for (int nr = 0; nr < VG_NR; ++nr)"
    assert lines[at - 2].strip() == "#pragma omp simd" and "?" not in lines[at]
    tile = text[text.index("static inline void vg_tile_inner"):]
    lines = tile[:tile.index("\n}\n")].splitlines()
    (at,) = [n for n, line in enumerate(lines) if "acc[im][in][l] += a[" in line]
    assert lines[at - 1].strip() == "for (int l = 0; l < VG_VL; ++l)" and lines[at - 2].strip() == "#pragma omp simd"
    # conv forward: the window is part of k; B is packed along contiguous runs (a simd loop
    # of contiguous loads, the zero padding's guards as masks); threads share n blocks
    fwd = kernel(kernels, "convolution2d_forward_y").text
    assert "const int vg_K = 9*IC;    // k = (ic, di, dj)" in fwd
    assert "const int vg_N = B*H*W;    // n = (b, i, j)" in fwd
    lines = fwd.splitlines()
    (at,) = [n for n, line in enumerate(lines) if "for (int vg_t = 0; vg_t < vg_len; ++vg_t)" in line]
    assert lines[at - 1].strip() == "#pragma omp simd"
    assert "? vg_src[vg_t] : 0" in lines[at + 1] and "vg_s_j[vg_t]" in lines[at + 1]
    assert re.search(r"#pragma omp for schedule\(static\)\s*for \(int vg_nb = 0; vg_nb < vg_nblocks; \+\+vg_nb\)", fwd)
    assert "vg_tile_outer(" in fwd and "vg_tile_inner(" not in fwd
    # conv ∂L/∂w reduces along its contiguous j (k = (b, i, j)) where k is long against m
    gw = kernel(kernels, "convolution2d_backward_g_w").text
    assert "const int vg_K = B*H*W;    // k = (b, i, j)" in gw
    assert "if (vg_K > VG_INNER * vg_M)" in gw and "vg_tile_inner(" in gw and "vg_tile_outer(" in gw


def test_cuda_schedules(vgg_cuda):
    text, kernels = vgg_cuda
    block = {k.name for k in kernels if k.schedule.mode == "block"}
    assert block == {"convolution2d_backward_g_w", "batchnormalization_forward_mu_var",
                     "batchnormalization_backward_g_gamma_g_beta", "softmaxcrossentropy_forward_m_s_l"}
    for k in kernels:
        # a tiled contraction keeps its simple schedule as <name>_simple (tests/test_cuda_tiled.py)
        simple = k.fallback or k.name
        assert f'extern "C" __global__ void __launch_bounds__(VG_THREADS)\n{simple}(' in k.text
        if k.algorithm is not None:                             # tests/compiler/test_winograd_cuda.py
            assert k.schedule.mode == "winograd"
        elif k.name in block:
            assert "__shared__ float vg_shared[VG_THREADS];" in k.text
            assert "vg_block_sum(" in k.text or "vg_block_max(" in k.text
        else:                                                   # thread per element, last dim fastest
            last = k.ir.parallel[-1]
            assert f"const int {last.var} = (int)(vg_q % ({last.extent}))" in k.text
    assert "__syncthreads();" in text and "\n#include" not in text


def test_every_kernel_carries_its_source_equations(vgg_c, vgg_cuda):
    for text, kernels in (vgg_c, vgg_cuda):
        for k in kernels:
            for stage in k.ir.stages:
                line = f"//   {stage.equation}"
                assert line in k.text and line in text, (k.name, line)


# --------------------------------------------------------------------------- build


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_reproducible_and_check_finds_stale_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    written = build(a)
    assert sorted(p.relative_to(a).as_posix() for p in written) == sorted(_tree(a))
    assert "c/vggen_kernels.c" in _tree(a) and "c/vggen_kernels.h" in _tree(a)
    assert len([p for p in _tree(a) if p.startswith("cuda/")]) == len(generated_layers())
    build(b)
    assert _tree(a) == _tree(b)
    mtime = (a / "manifest.json").stat().st_mtime_ns
    build(a)                                                    # unchanged files are not rewritten
    assert (a / "manifest.json").stat().st_mtime_ns == mtime
    # another process, another hash seed: same bytes
    env = dict(os.environ, PYTHONHASHSEED="12345")
    code = f"from vggen.compiler.emit import build; build({str(tmp_path / 'c')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    assert _tree(tmp_path / "c") == _tree(a)

    assert build(a, check=True) == []
    conv = a / "cuda" / "convolution2d.cu"
    conv.write_text(conv.read_text().replace("0.0f", "1.0f", 1))
    (a / "c" / "vggen_kernels.h").unlink()
    (a / "cuda" / "old_layer.cu").write_text("// left over\n")
    before = _tree(a)
    stale = build(a, check=True)
    assert stale == sorted([conv, a / "c" / "vggen_kernels.h", a / "cuda" / "old_layer.cu"])
    assert _tree(a) == before                                   # check writes nothing
    build(a)
    assert _tree(a) == _tree(b) and build(a, check=True) == []


def test_cli_check_exit_status(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "vggen.compiler.emit", "--out", str(tmp_path), *args],  # noqa: E731
                                       cwd=REPO, capture_output=True, text=True)
    assert run("--check").returncode == 1
    assert run().returncode == 0
    assert run("--check").returncode == 0


def test_manifest_describes_every_kernel(tmp_path):
    files = outputs()
    man = json.loads(files["manifest.json"])
    names = {(e["target"], e["name"]) for e in man["kernels"]}
    _, c_kernels = generate(generated_layers(), "c")
    # every kernel on both targets, the other algorithms' (Winograd) too
    assert names == {(t, k.name) for t in ("c", "cuda") for k in c_kernels}
    for e in man["kernels"]:
        text = files[e["file"]]
        sig = e["signature"]
        reads = [a["name"] for a in sig if a["access"] == "read"]
        writes = [a["name"] for a in sig if a["access"] == "write"]
        sizes = [a["name"] for a in sig if a["access"] == "size"]
        assert [a["access"] for a in sig] == ["read"] * len(reads) + ["write"] * len(writes) + ["size"] * len(sizes)
        assert reads == sorted(reads) and writes == sorted(writes) and sizes == sorted(sizes)
        assert e["reads"] == reads and e["writes"] == writes and e["sizes"] == sizes
        for a in sig[: len(reads) + len(writes)]:
            assert a["dtype"] in ("float32", "int32") and a["shape"] and len(a["lower"]) == len(a["shape"])
        for eq in e["equations"]:
            assert f"//   {eq}" in text
        if e["target"] == "cuda":
            assert e["launch"]["block"] == [256, 1, 1]
            grid = eval(e["launch"]["grid"][0], {}, {s: 3 for s in sizes})   # noqa: S307
            assert grid >= 1
    conv = [e for e in man["kernels"] if e["name"] == "convolution2d_forward_y" and e["target"] == "c"][0]
    assert [a["name"] for a in conv["signature"]] == ["w", "x", "y", "B", "H", "IC", "OC", "W"]
    assert conv["signature"][0]["shape"] == ["OC", "IC", "3", "3"] and conv["signature"][0]["lower"] == ["0", "0", "-1", "-1"]
    assert man["files"]["c/vggen_kernels.c"] == __import__("hashlib").sha256(files["c/vggen_kernels.c"].encode()).hexdigest()


def test_kernel_hashes_are_of_their_emitted_text(vgg_c):
    import hashlib

    text, kernels = vgg_c
    for k in kernels:
        assert k.text in text and k.sha256 == hashlib.sha256(k.text.encode()).hexdigest()


def test_generated_directory_is_current():
    """generated/ in the repository is what a build writes (run `python -m vggen.compiler.emit`)."""
    assert build(REPO / "generated", check=True) == []


# --------------------------------------------------------------------------- analysis


def _toy():
    b, c, i = indices("b c i")
    x = Tensor("x", (B, C), Role.INPUT)
    y = Tensor("y", (B, C), Role.OUTPUT)
    z = Tensor("z", (B,), Role.OUTPUT)
    n = Tensor("n", (B,), Role.OUTPUT, dtype="int")
    layer = Layer("Toy", [x, y, z, n], [Equation(y[b, c], 2 * x[b, c])])
    return layer, (x, y, z, n), (b, c, i)


def test_analysis_rejects_names_that_clash_in_c():
    b, c = indices("b c")
    x = Tensor("x", (B, C), Role.INPUT)
    y = Tensor("acc_y", (B, C), Role.OUTPUT)
    with pytest.raises(VggenError, match="cannot be a C identifier"):
        lower(Equation(y[b, c], x[b, c]), Layer("Bad", [x, y], []), {})
    s_ = Tensor("c", (B,), Role.OUTPUT)
    with pytest.raises(VggenError, match="names both a tensor and a index"):
        lower(Equation(s_[b], Sum(x[b, c], (c, 0, C))), Layer("Bad", [x, s_], []), {})


@pytest.mark.parametrize("case, message", [
    ("unbound", "every value of it would write the same element"),
    ("repeated", "distinct plain indices"),
    ("self", "reads the tensor the equation writes"),
    ("rank", "has 1 indices; x has rank 2"),
    ("unsupported", "has no C/CUDA form"),
    ("input", "x has role input"),
    ("int", "not integer-valued"),
    ("range", "can leave x's range"),
    ("data", "depends on tensor data"),
])
def test_analysis_rejects_unsafe_equations(case, message):
    layer, (x, y, z, n), (b, c, i) = _toy()
    eq = {
        "unbound": lambda: Equation(z[b], x[b, c]),                       # Σ over c not declared
        "repeated": lambda: Equation(y.base[b, b], x[b, c]),
        "self": lambda: Equation(y[b, c], y[b, c] + x[b, c]),
        "rank": lambda: Equation(z[b], sp.IndexedBase("x")[b]),
        "unsupported": lambda: Equation(y[b, c], sp.gamma(x[b, c])),
        "input": lambda: Equation(x[b, c], 2 * y[b, c]),
        "int": lambda: Equation(n[b], x[b, 0]),
        "range": lambda: Equation(y[b, c], x[b, c + 1]),
        "data": lambda: Equation(z[b], x[b, n[b]]),
    }[case]()
    with pytest.raises(VggenError, match=re.escape(message)):
        lower(eq, layer, {})


def test_analysis_rejects_argmax_over_a_runtime_window():
    layer = max_pooling2d()
    with pytest.raises(VggenError, match="ArgMax .* needs a constant window"):
        lower_layer(layer, {})


def test_analysis_runs_before_printing():
    """A bad equation fails generate() with VggenError, not a printer error."""
    layer, (x, y, z, n), (b, c, i) = _toy()
    bad = Layer("Bad", [x, y], [Equation(y[b, c], sp.gamma(x[b, c]))])
    with pytest.raises(VggenError, match="has no C/CUDA form"):
        generate([bad], "c")


def test_specialise_validates_sizes():
    with pytest.raises(VggenError, match="positive integer"):
        lower_layer(convolution2d(), {"K": 0})


def test_reduction_of_a_whole_row_is_allowed():
    layer, (x, y, z, n), (b, c, i) = _toy()
    k = lower(Equation(z[b], Sum(x[b, c] * x[b, c], (c, 0, C))), layer, {})
    assert k.cls is KernelClass.REDUCTION


def test_batchnorm_statistics_are_one_kernel():
    ks = lower_layer(batch_normalization(), VGG_SPECIALISE)
    assert [k.name for k in ks] == ["batchnormalization_forward_mu_var", "batchnormalization_forward_xhat_y"]
    mu_var = ks[0]
    assert mu_var.stages[1].reductions[0].body.has(mu_var.stages[0].local)    # σ² reads μ's register


def test_manifest_describes_the_c_schedules():
    man = json.loads(outputs()["manifest.json"])
    c = {e["name"]: e for e in man["kernels"] if e["target"] == "c"}
    conv = c["convolution2d_forward_y"]["schedule"]["gemm"]
    assert conv["m"] == ["oc"] and conv["n"] == ["b", "i", "j"] and conv["k"] == ["ic", "di", "dj"]
    assert conv["blocks"]["VG_MR"] == 8 and conv["forms"] == ["outer"]
    assert c["convolution2d_backward_g_w"]["schedule"]["gemm"]["forms"] == ["outer", "inner"]
    assert "gemm" not in c["relu_forward_y"]["schedule"]
    assert c["relu_forward_y"]["schedule"]["loops"] == ["b", "c", "ij"]          # coalesced
