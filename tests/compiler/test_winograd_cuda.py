"""The CUDA Winograd variants (``vggen.compiler.targets.cuda.winograd``): what
they look like, and that each equals the float64 convolution on odd shapes,
forward, ∂L/∂x and ∂L/∂w, run in the CPU emulation of CUDA
(``tests/compiler/test_cuda_emulation.py``): several grids, the same bits from
each.  nvcc compiles them with every other kernel
(``tests/compiler/test_cuda_compile.py``); on a GPU they run through the
runtime with the algorithm forced (``tools/gpu_check.sh``)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.compiler.test_cuda_emulation import CXX, SPECIALISE, _run, compile_emulation
from tests.helpers import REPO, layer_data, reference
from vggen.compiler.emit import generate
from vggen.compiler.targets.cuda.constants import THREADS
from vggen.compiler.targets.cuda.target import CudaTarget
from vggen.compiler.targets.cuda.winograd import BLOCKS
from vggen.derive.winograd import FLOAT32_BOUND
from vggen.frontend.layers import convolution2d
from vggen.manifest import eval_size

pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++")

BASES = ("convolution2d_forward_y", "convolution2d_backward_g_x", "convolution2d_backward_g_w")
# sizes no multiple of a tile; a 1×1 image; channels past a work item's 16 rows or columns
# and past a chunk of 8 terms; more tiles than one work item takes
SHAPES = [dict(B=2, IC=3, OC=5, H=7, W=6), dict(B=1, IC=1, OC=1, H=1, W=1),
          dict(B=1, IC=19, OC=17, H=5, W=3), dict(B=3, IC=9, OC=4, H=6, W=9)]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    text, kernels = generate([convolution2d()], "cuda", SPECIALISE)
    by_name = {g.name: g for g in kernels}
    return compile_emulation(text, kernels, tmp_path_factory.mktemp("wino")), by_name, text


def test_each_convolution_kernel_has_two_winograd_variants(emulated):
    kernels = emulated[1]
    for base in BASES:
        for m in (2, 4):
            g = kernels[f"{base}_winograd{m}"]
            assert g.algorithm["replaces"] == base and g.algorithm["tile"] == m
            assert [a.name for a in g.ir.args] == [a.name for a in kernels[base].ir.args]   # same signature
            launch = CudaTarget().manifest(g)["launch"]
            assert launch["block"] == [THREADS, 1, 1] and launch["grid_any"]


def test_variant_structure(emulated):
    """Transforms printed as device functions, the IR's reads and stores, the
    source equation and the algorithm in the comment, one launch, no atomics."""
    kernels = emulated[1]
    code = kernels["convolution2d_forward_y_winograd4"].text
    assert "//   y[b, oc, i, j] = Sum(w[oc, ic, di, dj]*x[b, ic, di + i, dj + j]" in code
    assert "F(4×4, 3×3) (points 0, 1, -1, 1/2, -2, ∞" in code
    text = emulated[2]
    for part in ("data", "filter", "output"):         # the file's, once per algorithm and part
        assert f"vg_winograd_f4x4_3x3_{part}(" in code
        assert text.count(f"static __device__ __forceinline__ void vg_winograd_f4x4_3x3_{part}(") == 1
    assert re.search(r"const float vg_y0_0 = 2\*vg_src\[0 \* vg_ss\] - 3\*vg_src\[6 \* vg_ss\]", text)
    assert "atomic" not in code and code.count("__global__") == 1
    g_x = kernels["convolution2d_backward_g_x_winograd2"].text
    # ∂L/∂x's tap (0, 0) reads w turned and transposed: w[c, o, 1, 1], printed from the IR
    assert "vg_x[0] = vg_live ? w[9*IC*vg_wc + 9*vg_wo + 8] : 0.0f;" in g_x
    g_w = kernels["convolution2d_backward_g_w_winograd2"].text
    assert "F(3×3, 2×2)" in g_w and "g_w[9*IC*vg_wo + 9*vg_wc] = vg_y[0];" in g_w


def test_the_template_holds_no_arithmetic():
    """Numbers in the CUDA Winograd template are 0 and 1 only: coefficients come
    from the transform matrices, block sizes from ``BLOCKS``."""
    template = (REPO / "templates" / "cuda" / "winograd.cu.j2").read_text()
    code = re.sub(r"\{#.*?#\}", "", template, flags=re.S)
    code = re.sub(r"//[^\n]*|indent\(\d+(, true)?\)", "", code)
    literals = set(re.findall(r"(?<![\w.])\d+\.\d*f?|(?<![\w.])\d+(?![\w.])", code))
    assert literals <= {"0", "1", "0.0f"}, literals


def test_the_blocks_share_the_threads_out_evenly():
    assert BLOCKS.subs * BLOCKS.groups == THREADS
    assert BLOCKS.shared_floats(6) * 4 <= 48 * 1024        # static shared memory, F(4×4)'s 6×6 tiles


@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_variants_equal_the_convolution(emulated, sizes):
    """Each variant against float64 (relative to the output's scale, within the
    transforms' float32 bound), on a grid of one block, one smaller than the
    work and the manifest's: the same bits from each."""
    lib, kernels, _ = emulated
    layer = convolution2d()
    env = layer_data(layer, sizes, SPECIALISE, np.random.default_rng(sum(sizes.values())))
    for base in BASES:
        want = reference(kernels[base], env, sizes, SPECIALISE)
        for m in (2, 4):
            gk = kernels[f"{base}_winograd{m}"]
            full = eval_size(CudaTarget().manifest(gk)["launch"]["grid"][0], sizes)
            runs = [_run(lib, gk, env, sizes, grid) for grid in sorted({1, 3, full})]
            for name, got in runs[0].items():
                scale = max(np.max(np.abs(want[name])), 1e-30)
                err = np.max(np.abs(got.astype(np.float64) - want[name])) / scale
                assert err < FLOAT32_BOUND[m], (gk.name, name, err)
                for other in runs[1:]:
                    assert np.array_equal(got, other[name]), (gk.name, "grid")


def test_cuda_runs_direct_unless_measured_or_forced(tmp_path):
    """No cost model for a GPU: "auto" takes what `vggen tune --target cuda` measured
    on this GPU, else direct; a forced algorithm runs its variant; the records of
    algorithms-cuda.json reach the CUDA entries of the manifest only."""
    import json

    from vggen.compiler.emit import outputs
    from vggen.compiler.measured import RECORD_FILES
    from vggen.manifest import read_manifest
    from vggen.runtime.algorithms import choose

    sizes = {"B": 64, "H": 32, "IC": 64, "OC": 64, "W": 32}
    record = {"device": "NVIDIA H200", "kernels": {"convolution2d_forward_y": [
        {"sizes": sizes, "algorithm": "winograd2", "ms": {"direct": 2.0, "winograd2": 1.0}}]}}
    files = outputs([convolution2d()], measured={"cuda": record, "c": {"device": "", "kernels": {}}})
    manifest = json.loads(files["manifest.json"])
    assert manifest["algorithms"] == {"cuda": {"file": RECORD_FILES["cuda"], "device": "NVIDIA H200"}}
    (tmp_path / "manifest.json").write_text(files["manifest.json"])
    specs = {(s.target, s.name): s for s in read_manifest(tmp_path).kernels}
    assert "measured" not in specs[("c", "convolution2d_forward_y")].entry
    spec = specs[("cuda", "convolution2d_forward_y")]
    alts = read_manifest(tmp_path).alternatives(spec)
    assert sorted(a.algorithm for a in alts) == ["winograd2", "winograd4"] and {a.target for a in alts} == {"cuda"}
    assert choose(spec, alts, sizes, measured_here=True, model=False).algorithm == "winograd2"
    assert choose(spec, alts, sizes, measured_here=False, model=False) is spec           # another GPU's record
    assert choose(spec, alts, {**sizes, "B": 8}, measured_here=True, model=False) is spec  # other sizes
    assert choose(spec, alts, sizes, "winograd4", measured_here=False, model=False).algorithm == "winograd4"


@pytest.mark.parametrize("algorithm", ["winograd2", "winograd4"])
def test_variants_equal_the_direct_kernels_on_a_gpu(algorithm):
    """On a GPU: forward, ∂L/∂x and ∂L/∂w through the CUDA runtime with the
    algorithm forced, against the direct kernels, on odd shapes."""
    from vggen.derive.autodiff import derive
    from vggen.runtime import cuda_available

    if not cuda_available():
        pytest.skip("needs CuPy and a GPU")
    from vggen.runtime.cuda import CudaBackend

    be = CudaBackend(REPO / "generated")
    conv, back = convolution2d(1), derive(convolution2d(1)).program
    for sizes in ({"B": 3, "IC": 5, "OC": 7, "H": 9, "W": 11}, {"B": 2, "IC": 33, "OC": 40, "H": 6, "W": 13}):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((sizes["B"], sizes["IC"], sizes["H"], sizes["W"])).astype(np.float32)
        w = rng.standard_normal((sizes["OC"], sizes["IC"], 3, 3)).astype(np.float32)
        gy = rng.standard_normal((sizes["B"], sizes["OC"], sizes["H"], sizes["W"])).astype(np.float32)
        results = {}
        for policy in ("direct", algorithm):
            be.conv_algorithm = policy
            on = {name: be.asarray(a) for name, a in (("x", x), ("w", w), ("g_y", gy))}
            y = be.run(conv, sizes, {"x": on["x"], "w": on["w"]})["y"]
            grads = be.run(back, sizes, on)
            results[policy] = [be.to_host(a) for a in (y, grads["g_x"], grads["g_w"])]
        for got, want, what in zip(results[algorithm], results["direct"], ("y", "g_x", "g_w")):
            scale = np.max(np.abs(want))
            assert np.max(np.abs(got - want)) / scale < FLOAT32_BOUND[int(algorithm[-1])], (what, sizes)


def test_a_channels_last_convolution_gets_cuda_variants_that_agree(tmp_path):
    """A user's channels-last 3×3 convolution (tests/compiler/test_winograd_c.py):
    its six CUDA variants in emulation against float64."""
    from tests.compiler.test_winograd_c import convolution_channels_last

    layer = convolution_channels_last()
    text, kernels = generate([layer], "cuda", SPECIALISE)
    variants = [g for g in kernels if g.algorithm is not None]
    assert len(variants) == 6
    lib = compile_emulation(text, kernels, tmp_path)
    sizes = dict(B=2, IC=5, OC=18, H=7, W=5)
    env = layer_data(layer, sizes, SPECIALISE, np.random.default_rng(7))
    for gk in variants:
        want = reference(gk, env, sizes, SPECIALISE)
        for name, got in _run(lib, gk, env, sizes, 3).items():
            err = np.max(np.abs(got.astype(np.float64) - want[name])) / np.max(np.abs(want[name]))
            assert err < FLOAT32_BOUND[gk.algorithm["tile"]], (gk.name, err)
