"""--precision bf16 on the C target: the contractions' products in bf16 (AMX, AVX-512 BF16).

The bf16 library (generated/c compiled with -DVG_BF16) against float64 NumPy
at odd shapes, through both matrix-product forms (outer and inner) and odd k,
its outer form on AMX tiles where the CPU and the OS allow them and, built
with -DVG_BF16_NO_AMX, on AVX-512 BF16 dot products;
the fp32 library untouched by it; the refusals where bf16 cannot run.

Tolerance.  Each operand is rounded to bf16 (8 significant bits, to nearest):
a relative error of at most u = 2^-8 each (half a unit in the 8th bit; about
2^-9 on average), so a product's is at most (1 + u)^2 - 1 < 2^-7 · 1.004; the
fp32 accumulation adds at most about k · 2^-24 of Σ|a·b| (k ≤ 400 here:
< 2^-15).  Hence, per output,

    |got − ref| ≤ 2^-7 · 1.01 · Σ_k |a_k|·|b_k|,

Σ|a|·|b| being the same contraction on the operands' absolute values (the
kernels are bilinear and zero padding stays zero).  The fp32 library is held
to 2^-16 of the same sum.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from tests.helpers import REPO
from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend import layers
from vggen.runtime import c as c_runtime
from vggen.runtime import get_backend

BF16_BOUND = 2.0 ** -7 * 1.01
FP32_BOUND = 2.0 ** -16


def _can_bf16() -> str | None:
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler"
    return c_runtime.bf16_missing(cc)


needs_bf16 = pytest.mark.skipif(_can_bf16() is not None, reason=str(_can_bf16()))


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """The fp32 C backend and the bf16 ones (AMX where it runs, and without it) on the
    repository's generated kernels, a cache of their own."""
    if not (REPO / "generated" / "manifest.json").is_file():
        pytest.skip("generated/ not built")
    cache = tmp_path_factory.mktemp("cache")
    fp32 = c_runtime.CBackend(generated=REPO / "generated", cache=cache)
    bf16 = {"amx": c_runtime.CBackend(generated=REPO / "generated", cache=cache, precision="bf16"),
            "avx512": c_runtime.CBackend(generated=REPO / "generated", cache=cache, precision="bf16",
                                         flags=(*c_runtime.FLAGS, "-DVG_BF16_NO_AMX"))}
    return fp32, bf16


# --------------------------------------------------------------------------- references (float64)


def _conv_ref(x, w, g_y):
    """y, ∂L/∂x, ∂L/∂w of a 3×3 zero-padded convolution, in float64."""
    B, IC, H, W = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    gp = np.pad(g_y.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    w = w.astype(np.float64)
    y = sum(np.einsum("oc,bchw->bohw", w[:, :, a, d], xp[:, :, a:a + H, d:d + W])
            for a in range(3) for d in range(3))
    g_x = sum(np.einsum("oc,bohw->bchw", w[:, :, a, d], gp[:, :, 2 - a:2 - a + H, 2 - d:2 - d + W])
              for a in range(3) for d in range(3))
    g_w = np.stack([np.stack([np.einsum("bohw,bchw->oc", g_y.astype(np.float64), xp[:, :, a:a + H, d:d + W])
                              for d in range(3)], -1) for a in range(3)], -2)
    return {"y": y, "g_x": g_x, "g_w": g_w}


def _linear_ref(x, w, g_y):
    x, w, g_y = (v.astype(np.float64) for v in (x, w, g_y))
    return {"y": x @ w, "g_x": g_y @ w.T, "g_w": x.T @ g_y}


def _run(backend, layer, sizes, arrays):
    """The forward output and both gradients of ``layer`` on ``backend``."""
    out = dict(backend.run(layer, sizes, {k: arrays[k] for k in ("x", "w")}))
    out.update(backend.run(derive(layer).program, sizes, arrays))
    return out


def _cases():
    rng = np.random.default_rng(7)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    # conv: k = 9·IC odd; ∂L/∂w inner where B·H·W > 2·OC, outer where not; IC = 37: k = 333,
    # two k blocks, the last odd
    for B, IC, OC, H, W in [(3, 5, 7, 9, 11), (1, 3, 9, 2, 2), (2, 37, 5, 3, 5)]:
        sizes = {"B": B, "IC": IC, "OC": OC, "H": H, "W": W}
        yield (f"conv-{B}x{IC}to{OC}x{H}x{W}", layers.convolution2d(1), sizes,
               {"x": f32(B, IC, H, W), "w": f32(OC, IC, 3, 3), "g_y": f32(B, OC, H, W)}, _conv_ref)
    for B, IC, C in [(3, 5, 7), (3, 45, 11), (17, 6, 3)]:
        yield (f"linear-{B}x{IC}to{C}", layers.linear(), {"B": B, "IC": IC, "C": C},
               {"x": f32(B, IC), "w": f32(IC, C), "g_y": f32(B, C)}, _linear_ref)


CASES = list(_cases())


def _check(got, arrays, ref, bound, what):
    want = ref(arrays["x"], arrays["w"], arrays["g_y"])
    scale = ref(*(np.abs(arrays[k]) for k in ("x", "w", "g_y")))    # Σ|a|·|b| per output
    for name in ("y", "g_x", "g_w"):
        err = np.abs(got[name].astype(np.float64) - want[name])
        limit = bound * scale[name] + 1e-30
        worst = np.unravel_index(np.argmax(err / limit), err.shape)
        assert (err <= limit).all(), (f"{what} {name}: |err| {err[worst]:.3g} > {limit[worst]:.3g} "
                                      f"at {worst}")


# --------------------------------------------------------------------------- numerics


@needs_bf16
@pytest.mark.parametrize("unit", ["amx", "avx512"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bf16_contractions_within_rounding_bound(libraries, case, unit):
    what, layer, sizes, arrays, ref = case
    fp32, bf16 = libraries
    # the direct kernels (the Winograd ones are held to their own bound below)
    bf16[unit].conv_algorithm = fp32.conv_algorithm = "direct"
    try:
        got = _run(bf16[unit], layer, sizes, arrays)
        exact = _run(fp32, layer, sizes, arrays)
    finally:
        bf16[unit].conv_algorithm = fp32.conv_algorithm = "auto"
    _check(got, arrays, ref, BF16_BOUND, what)
    # and bf16 it is: the products were rounded (fp32 would be far closer)
    assert any(not np.array_equal(got[n], exact[n]) for n in ("y", "g_x", "g_w"))


@needs_bf16
def test_bf16_is_a_library_of_its_own(libraries):
    fp32, bf16 = libraries
    assert len({fp32.library, bf16["amx"].library, bf16["avx512"].library}) == 3
    assert bf16["amx"].precision == "bf16" and fp32.precision == "fp32"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_library_stays_fp32(c_backend, case):
    """The direct kernels' fp32 products (the Winograd ones are held to their own
    bound in tests/compiler/test_winograd_c.py)."""
    what, layer, sizes, arrays, ref = case
    c_backend.conv_algorithm = "direct"
    try:
        _check(_run(c_backend, layer, sizes, arrays), arrays, ref, FP32_BOUND, what)
    finally:
        c_backend.conv_algorithm = "auto"


def test_fp32_translation_unit_has_no_bf16_code():
    """Without VG_BF16 the preprocessor leaves none of the bf16 path in the C."""
    cc = shutil.which("cc")
    source = REPO / "generated" / "c" / "vggen_kernels.c"
    if cc is None or not source.is_file():
        pytest.skip("no C compiler or generated/ not built")
    text = subprocess.run([cc, "-march=native", "-fopenmp", "-E", "-P", str(source)],
                          capture_output=True, text=True, check=True).stdout
    for name in ("vg_tile_outer_bf16", "vg_tile_inner_bf16", "vg_bf16_pairs", "vg_bf16_row", "vg_a2", "vg_b16",
                 "vg_tile_outer_amx", "_tile_loadd("):
        assert name not in text
    assert "vg_tile_outer(" in text and "vg_tile_inner(" in text


# --------------------------------------------------------------------------- refusals


def test_bf16_refused_without_the_cpu_flag(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512bw\n")
    reason = c_runtime.bf16_missing(shutil.which("cc") or "cc", cpuinfo=cpuinfo)
    assert reason and "avx512_bf16" in reason


def test_bf16_refused_without_the_compiler_macro(monkeypatch):
    monkeypatch.setattr(c_runtime, "_cpu_flags", lambda cpuinfo=None: {"avx512_bf16"})
    monkeypatch.setattr(c_runtime, "_compiler_macros", lambda cc, flags: "#define __AVX512F__ 1\n")
    with pytest.raises(VggenError, match="does not define __AVX512BF16__"):
        c_runtime.precision_flags("bf16", "cc")
    assert c_runtime.precision_flags("fp32", "cc") == c_runtime.FLAGS


def test_bf16_is_the_c_targets_only():
    with pytest.raises(VggenError, match="c target only"):
        get_backend("numpy", precision="bf16")
    with pytest.raises(VggenError, match="unknown precision"):
        get_backend("numpy", precision="fp8")


# --------------------------------------------------------------------------- Winograd in bf16

# The Winograd variants' channel sums in bf16 too: the transformed operands are rounded,
# and the transforms amplify that rounding (their coefficients' magnitudes), so these are
# bounds measured on these shapes, relative to the output's largest |value|: about
# 5e-3 for F(2×2) (direct: 4e-3) and up to 3.4e-2 for F(4×4) (above 3e-2: bf16's "auto"
# leaves F(4×4) out, vggen.runtime.base.BF16_ALGORITHMS).
BF16_WINOGRAD_BOUND = {"winograd2": 1e-2, "winograd4": 5e-2}
WINOGRAD_SHAPES = [(3, 5, 7, 9, 11), (2, 40, 9, 4, 7), (6, 3, 4, 27, 26)]   # the last: ∂L/∂w in chunks


@needs_bf16
@pytest.mark.parametrize("unit", ["amx", "avx512"])
@pytest.mark.parametrize("algorithm", ["winograd2", "winograd4"])
@pytest.mark.parametrize("shape", WINOGRAD_SHAPES, ids=["x".join(map(str, s)) for s in WINOGRAD_SHAPES])
def test_bf16_winograd_within_its_bound(libraries, shape, algorithm, unit):
    from vggen.runtime.winograd import direct_conv2d, direct_conv2d_weight_gradient

    b, ic, oc, h, w = shape
    sizes = {"B": b, "IC": ic, "OC": oc, "H": h, "W": w}
    rng = np.random.default_rng(sum(shape))
    arrays = {"x": rng.standard_normal((b, ic, h, w)).astype(np.float32),
              "w": rng.standard_normal((oc, ic, 3, 3)).astype(np.float32),
              "g_y": rng.standard_normal((b, oc, h, w)).astype(np.float32)}
    x, wt, gy = (arrays[k].astype(np.float64) for k in ("x", "w", "g_y"))
    want = {"y": direct_conv2d(x, wt),
            "g_x": direct_conv2d(gy, np.ascontiguousarray(wt[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))),
            "g_w": direct_conv2d_weight_gradient(x, gy)}
    fp32, bf16 = libraries
    results = {}
    for backend in (bf16[unit], fp32):
        backend.conv_algorithm = algorithm
        try:
            results[backend.precision] = _run(backend, layers.convolution2d(1), sizes, arrays)
        finally:
            backend.conv_algorithm = "auto"
    for name in ("y", "g_x", "g_w"):
        scale = np.max(np.abs(want[name]))
        err = np.max(np.abs(results["bf16"][name] - want[name])) / scale
        assert err < BF16_WINOGRAD_BOUND[algorithm], (algorithm, name, err)
        # and bf16 it is: far from the fp32 variant's error
        assert err > 10 * np.max(np.abs(results["fp32"][name] - want[name])) / scale, (algorithm, name)


def test_bf16_auto_leaves_out_winograd4():
    from vggen.runtime.base import BF16_ALGORITHMS
    assert "winograd2" in BF16_ALGORITHMS and "winograd4" not in BF16_ALGORITHMS
