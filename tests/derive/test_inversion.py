"""Strided, floor and Mod accesses inverted into gathers (``derive``'s δ elimination).

Every layer here is written through the public front end only (max pooling
and nearest upsampling are the zoo's, vggen/frontend/zoo.py).  For each, the
derived ∂L/∂x gathers over exactly the window positions (or the preimage)
that reach an element: integer loops, no fraction in any subscript, no guard
that sums over the whole plane.  It equals finite differences and a float64
NumPy scatter written here by hand; its C kernels compile and equal the
reference on odd shapes; its CUDA compiles with nvcc and runs in the CPU
emulation.  A subscript that is not provably an integer is a VggenError
naming the equation, before anything is printed.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import sympy as sp

from tests.compiler.test_cuda_compile import NVCC, needs_nvcc
from tests.compiler.test_cuda_emulation import CXX, _check, _run, compile_emulation
from tests.helpers import (
    CC,
    check_layer_kernels,
    compile_c,
    layer_data,
    needs_cc,
    reference,
)
from vggen.compiler import symbolic
from vggen.compiler.emit import generate, render
from vggen.compiler.ir import KernelClass
from vggen.compiler.pipeline import lower, lower_layer
from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend import lang
from vggen.frontend.lang import (
    Equation,
    Layer,
    Role,
    Sum,
    Tensor,
    indices,
    sizes,
)
from vggen.frontend.zoo import max_pooling, nearest_upsampling
from vggen.proof.evaluate import run_forward
from vggen.proof.verify import check_layer

B, C, OC, H, W, HO, WO = sizes("B C OC H W HO WO")
b, c, o, i, j, p, q = indices("b c o i j p q")
ODD = dict(B=2, C=3, OC=4, H=7, W=9)     # the x plane of every layer below: 7 × 9


# --------------------------------------------------------------------------- layers


def conv(k: int, s: int, pad: int, d: int = 1) -> Layer:
    """y(b,o,i,j) = Σ_{c,p,q} w(o,c,p,q)·x(b,c,s·i + d·p − pad, s·j + d·q − pad)."""
    x = Tensor("x", (B, C, H, W), Role.INPUT, zero_outside=True)
    w = Tensor("w", (OC, C, k, k), Role.PARAMETER)
    y = Tensor("y", (B, OC, HO, WO), Role.OUTPUT)
    body = w[o, c, p, q] * x[b, c, s * i + d * p - pad, s * j + d * q - pad]
    name = f"Conv{k}x{k}S{s}P{pad}" + (f"D{d}" if d != 1 else "")
    return Layer(name, [x, w, y], [Equation(y[b, o, i, j], Sum(body, (c, 0, C), (p, 0, k), (q, 0, k)))])


def wrap(s: int) -> Layer:
    """A periodic read through Mod: y(b,c,i) = x(b,c,(i + 1) mod s)."""
    x = Tensor("x", (B, C, s), Role.INPUT)
    y = Tensor("y", (B, C, H), Role.OUTPUT)
    return Layer(f"Wrap{s}", [x, y], [Equation(y[b, c, i], x[b, c, sp.Mod(i + 1, s)])])


# --------------------------------------------------------------------------- references (scatter, by hand)


def conv_sizes(k, s, pad, d=1):
    out = lambda n: (n + 2 * pad - d * (k - 1) - 1) // s + 1
    return {**ODD, "HO": out(ODD["H"]), "WO": out(ODD["W"])}


def conv_scatter(k, s, pad, d=1):
    def g_x(env, n):
        gx = np.zeros((n["B"], n["C"], n["H"], n["W"]))
        for pp in range(k):
            for qq in range(k):
                for ii in range(n["HO"]):
                    for jj in range(n["WO"]):
                        t, u = s * ii + d * pp - pad, s * jj + d * qq - pad
                        if 0 <= t < n["H"] and 0 <= u < n["W"]:
                            gx[:, :, t, u] += env["g_y"][:, :, ii, jj] @ env["w"][:, :, pp, qq]
        return gx
    return g_x


def pool_scatter(k, s):
    def g_x(env, n):
        gx = np.zeros(env["x"].shape)
        for bb, cc, ii, jj in np.ndindex(env["sel"].shape):
            pp, qq = divmod(int(env["sel"][bb, cc, ii, jj]), k)
            gx[bb, cc, s * ii + pp, s * jj + qq] += env["g_y"][bb, cc, ii, jj]
        return gx
    return g_x


def upsample_scatter(s):
    def g_x(env, n):
        return env["g_y"].reshape(n["B"], n["C"], n["H"], s, n["W"], s).sum(axis=(3, 5))
    return g_x


def wrap_scatter(s):
    def g_x(env, n):
        gx = np.zeros((n["B"], n["C"], s))
        for ii in range(n["H"]):
            gx[:, :, (ii + 1) % s] += env["g_y"][:, :, ii]
        return gx
    return g_x


# id: (layer, sizes, the extents ∂L/∂x sums over, parity guards, scatter reference)
CASES = {
    "conv3x3_s2_p1": (lambda: conv(3, 2, 1), conv_sizes(3, 2, 1), [OC, 2, 2], 0, conv_scatter(3, 2, 1)),
    "conv5x5_s2_p2": (lambda: conv(5, 2, 2), conv_sizes(5, 2, 2), [OC, 3, 3], 0, conv_scatter(5, 2, 2)),
    "conv2x2_s2": (lambda: conv(2, 2, 0), conv_sizes(2, 2, 0), [OC], 0, conv_scatter(2, 2, 0)),
    "conv1x1_s2": (lambda: conv(1, 2, 0), conv_sizes(1, 2, 0), [OC], 2, conv_scatter(1, 2, 0)),
    "conv3x3_s3_p1": (lambda: conv(3, 3, 1), conv_sizes(3, 3, 1), [OC], 0, conv_scatter(3, 3, 1)),
    "conv3x3_s2_p1_d2": (lambda: conv(3, 2, 1, 2), conv_sizes(3, 2, 1, 2), [OC, 3, 3], 2,
                         conv_scatter(3, 2, 1, 2)),
    "conv3x3_s2_p1_d3": (lambda: conv(3, 2, 1, 3), conv_sizes(3, 2, 1, 3), [OC, 2, 2], 0,
                         conv_scatter(3, 2, 1, 3)),
    "maxpool3x3_s2": (lambda: max_pooling(3, 2), dict(B=2, C=3, HO=3, WO=4), [2, 2], 0, pool_scatter(3, 2)),
    "upsample2": (lambda: nearest_upsampling(2), dict(B=2, C=3, H=7, W=9), [2, 2], 0, upsample_scatter(2)),
    "upsample3": (lambda: nearest_upsampling(3), dict(B=2, C=3, H=7, W=9), [3, 3], 0, upsample_scatter(3)),
    "mod3": (lambda: wrap(3), dict(B=2, C=3, H=7), [sp.floor(H / 3) + 1], 0, wrap_scatter(3)),
}


def _case(name):
    make, n, extents, parities, scatter = CASES[name]
    return make(), n, extents, parities, scatter


def _consts(n: dict) -> dict:
    return {s: n[s.name] for s in (B, C, OC, H, W, HO, WO) if s.name in n}


def _fractions_in_subscripts(expr) -> list:
    """Subscripts with a fraction outside a floor (floor(i/2 + 1/2) is integer division)."""
    def bare(e):
        if isinstance(e, sp.floor):
            return False
        return (e.is_Rational and not e.is_Integer) or any(bare(a) for a in e.args)
    return [ix for acc in expr.atoms(sp.Indexed) for ix in acc.indices if bare(sp.sympify(ix))]


# --------------------------------------------------------------------------- the derived gather


@pytest.mark.parametrize("name", CASES)
def test_the_gather_runs_over_the_window_positions_that_reach_an_element(name):
    layer, _, extents, parities, _ = _case(name)
    g = derive(layer).gradient("x").equation
    rhs = g.rhs
    assert not rhs.has(sp.KroneckerDelta) or name.startswith("maxpool")   # only the argmax test stays
    assert not _fractions_in_subscripts(rhs), _fractions_in_subscripts(rhs)
    assert all(lang.integer_index(ix) for acc in rhs.atoms(sp.Indexed) for ix in acc.indices)
    sums = list(rhs.atoms(sp.Sum))
    assert len(sums) <= 1
    got = [sp.expand(hi - lo + 1) for _, lo, hi in sums[0].limits] if sums else []
    assert sorted(got, key=sp.default_sort_key) == sorted(extents, key=sp.default_sort_key), got
    # no δ left as a guard over the plane: the only equalities are parity tests of an output index
    eqs = [e for e in rhs.atoms(sp.Eq)]
    assert len(eqs) == parities, eqs
    summed = {v for s in sums for v in s.variables}
    for e in eqs:
        assert isinstance(e.lhs, sp.Mod) and e.rhs == 0 and not e.free_symbols & summed
    for bound in [x for s in sums for _, lo, hi in s.limits for x in (lo, hi)]:
        assert lang.integer_index(bound)


def test_an_upsampling_gather_is_s_by_s_reads():
    g = derive(nearest_upsampling(2)).gradient("x").equation
    assert str(g) == "g_x[b, c, i, j] = Sum(g_y[b, c, 2*i + i2, 2*j + j2], (i2, 0, 1), (j2, 0, 1))"


def test_a_stride_equal_to_the_window_is_euclidean_division():
    """2×2, stride 2: i = ⌊a/2⌋, p = a mod 2, no window loop; the front end
    bounds w's Mod index itself (it used to ask for w to be zero outside)."""
    g = derive(conv(2, 2, 0)).gradient("x").equation
    reads = {str(a) for a in g.rhs.atoms(sp.Indexed)}
    assert reads == {"g_y[b, o, floor(i/2), floor(j/2)]", "w[o, c, Mod(i, 2), Mod(j, 2)]"}


@pytest.mark.parametrize("name", CASES)
def test_the_gradient_passes_finite_differences(name):
    layer, *_ = _case(name)
    rows = check_layer(layer, docs=[])
    assert rows and all(r.verdict == "pass" for r in rows), rows
    assert all(r.fd_error < 1e-6 for r in rows)


@pytest.mark.parametrize("name", CASES)
def test_the_gradient_equals_a_numpy_scatter_on_odd_shapes(name):
    layer, n, _, _, scatter = _case(name)
    consts = _consts(n)
    rng = np.random.default_rng(1)
    env = {t.name: rng.standard_normal(tuple(int(s.subs(consts)) for s in t.shape))
           for t in layer.tensors if t.role in (Role.INPUT, Role.PARAMETER)}
    env = run_forward(layer, env, consts)
    bw = derive(layer)
    env["g_y"] = rng.standard_normal(env["y"].shape)
    env = run_forward(bw.program, env, consts)
    np.testing.assert_allclose(env["g_x"], scatter(env, n), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- kernels


@pytest.fixture(scope="module")
def c_kernels(tmp_path_factory):
    layers = [_case(name)[0] for name in CASES]
    text, kernels = generate(layers, "c", {})
    lib = compile_c(text, tmp_path_factory.mktemp("inversion")) if CC else None
    return layers, text, kernels, lib


def _kernel(kernels, name):
    return next(k for k in kernels if k.name == name)


def test_the_loop_nests_are_the_gathers(c_kernels):
    """Devito-style: the kernel IR's loops, not only its numbers."""
    _, _, kernels, _ = c_kernels
    # conv 3×3 / 2: one run-time loop over o, the 2×2 reachable taps unrolled, each under its guard
    k = _kernel(kernels, "conv3x3s2p1_backward_g_x").ir
    assert k.cls is KernelClass.REDUCTION
    assert [(lp.var.name, lp.extent) for lp in k.parallel] == [("b", B), ("c", C), ("i", H), ("j", W)]
    (r,) = k.reductions
    assert [(lp.var.name, lp.extent) for lp in r.loops] == [("o", OC)]
    terms = sp.Add.make_args(r.body)
    assert len(terms) == 4 and all(isinstance(t, sp.Piecewise) for t in terms)
    # 5×5 / 2: 3×3 taps
    (r,) = _kernel(kernels, "conv5x5s2p2_backward_g_x").ir.reductions
    assert len(sp.Add.make_args(r.body)) == 9
    # nearest upsampling ×2: an elementwise map of 4 reads, no guard, no loop over the plane
    k = _kernel(kernels, "upsample2_backward_g_x").ir
    assert k.cls is KernelClass.ELEMENTWISE and not k.reductions
    value = k.stages[0].value
    assert len(sp.Add.make_args(value)) == 4 and not value.has(sp.Piecewise)
    assert len(sp.Add.make_args(_kernel(kernels, "upsample3_backward_g_x").ir.stages[0].value)) == 9
    # through Mod: one loop over the ⌊H/3⌋ + 1 periods, not over H
    (r,) = _kernel(kernels, "wrap3_backward_g_x").ir.reductions
    assert [(lp.var.name, lp.first, lp.last) for lp in r.loops] == [("i2", 0, sp.floor(H / 3))]
    # overlapping max pooling: the 2×2 windows that hold an element, unrolled
    k = _kernel(kernels, "maxpool3x3s2_backward_g_x").ir
    assert k.cls is KernelClass.ELEMENTWISE and len(sp.Add.make_args(k.stages[0].value)) == 4
    # integer arithmetic throughout: no float floor or fmod, every subscript an integer
    for g in kernels:
        for e in g.ir.expressions():
            assert not _fractions_in_subscripts(e), (g.name, e)
        if "backward_g_x" in g.name:
            assert "floorf" not in g.text and "fmodf" not in g.text, g.name


@needs_cc
@pytest.mark.parametrize("name", CASES)
def test_the_c_kernels_equal_the_reference_on_odd_shapes(c_kernels, name):
    layers, _, kernels, lib = c_kernels
    layer = layers[list(CASES).index(name)]
    checked = check_layer_kernels(lib, kernels, layer, CASES[name][1], specialise={})
    assert any(k.endswith("backward_g_x") for k in checked), checked


def _cuda_gathers(names):
    """The CUDA ∂L/∂x kernels of the cases ``names`` (the rest of each layer is not new)."""
    ir = []
    for name in names:
        program = derive(_case(name)[0]).program
        ir.append(lower(program.definition("g_x"), program, {}))
    return render(ir, "cuda")


@needs_nvcc
def test_the_cuda_compiles_with_nvcc(tmp_path):
    text, kernels = _cuda_gathers(CASES)
    src = tmp_path / "inversion.cu"
    src.write_text(text)
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings", "-o",
                          str(src.with_suffix(".cubin")), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    blob = src.with_suffix(".cubin").read_bytes()
    assert all(k.name.encode() + b"\0" in blob for k in kernels)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_the_cuda_gathers_run_in_emulation(tmp_path):
    names = ["conv3x3_s2_p1", "conv3x3_s2_p1_d2", "maxpool3x3_s2", "upsample3", "mod3"]
    text, kernels = _cuda_gathers(names)
    lib = compile_emulation(text, kernels, tmp_path)
    by_name = {g.name: g for g in kernels}
    for n, name in enumerate(names):
        layer, sizes_ = _case(name)[:2]
        env = layer_data(layer, sizes_, {}, np.random.default_rng(n))
        gk = by_name[f"{layer.name.lower()}_backward_g_x"]
        want = reference(gk, env, sizes_, {})
        for grid in (2, 40):
            _check(gk, _run(lib, gk, env, sizes_, grid), want, f"grid {grid}")


# --------------------------------------------------------------------------- rejected before printing


def _half():
    x = Tensor("x", (B, H), Role.INPUT, zero_outside=True, differentiable=False)
    y = Tensor("y", (B, H), Role.OUTPUT)
    return x, y


def test_a_rational_subscript_is_rejected_by_the_front_end():
    x, y = _half()
    with pytest.raises(VggenError, match=r"index i/2 is not provably an integer.*y\[b, i\] = x\[b, i/2\]"):
        Layer("Half", [x, y], [Equation(y[b, i], x[b, i / 2])])


def test_a_rational_subscript_or_bound_is_rejected_by_the_analysis_before_printing():
    x, y = _half()
    layer = Layer("Half", [x, y], [Equation(y[b, i], x[b, i])])
    with pytest.raises(VggenError, match=r"cannot generate a kernel for y in Half \(y\[b, i\] = x\[b, i/2\]\): "
                                         r"access x\[b, i/2\]: index i/2 is not provably an integer"):
        lower(Equation(y[b, i], x[b, i / 2]), layer, {})
    with pytest.raises(VggenError, match=r"loop bound H/2 of q .* is not provably an integer"):
        lower(Equation(y[b, i], Sum(x[b, q], (q, 0, H / 2 + 1))), layer, {})
    half = Tensor("h", (B, H / 2), Role.OUTPUT)          # its loop bound would be H/2
    with pytest.raises(VggenError, match=r"h's shape \(B, H/2\) .* holds H/2, which is not provably an integer"):
        lower(Equation(half[b, i], x[b, i]), Layer("Half", [x, y, half], []), {})
    # an equation no front end saw: generate stops in the analysis, with no C text
    layer.equations.append(Equation(y[b, i], x[b, (i + 1) / 2]))
    with pytest.raises(VggenError, match=r"in Half \(y\[b, i\] = x\[b, i/2 \+ 1/2\]\).*not provably an integer"):
        generate([layer], "c", {})


def test_a_derived_equation_with_a_rational_subscript_names_the_layer_and_the_equation():
    program = derive(nearest_upsampling(2)).program
    (g,) = program.equations
    g_y = program.tensor("g_y").base
    program.equations[0] = Equation(g.lhs, g_y[b, c, i / 2, j / 2], g.label)
    with pytest.raises(VggenError, match=r"∂L/∂x of g_x in Upsample2 backward \(g_x\[b, c, i, j\] = "
                                         r"g_y\[b, c, i/2, j/2\]\).*not provably an integer"):
        lower_layer(program, {})


# --------------------------------------------------------------------------- one range analysis


def test_one_range_analysis_bounds_floor_and_mod():
    rng = {i: (0, H - 1), p: (0, 1)}
    assert symbolic.value_range is lang.affine_range
    assert lang.affine_range(sp.Mod(i + 1, 2) + 2 * p, rng) == (0, 3)
    assert lang.affine_range(sp.floor((i + 1) / 2) - p, rng) == (-1, sp.floor(H / 2))
    assert lang.affine_range(sp.Mod(p, 2), rng) == (0, 1)
    assert lang.affine_range(sp.floor(i / 2), {i: (0, 2 * H - 1)}) == (0, H - 1)
    # a guard the read sits under is a fact: 2·p + (i + 1) mod 2 ≤ 2 keeps w's index in 0..2
    d = 2 - sp.Mod(i + 1, 2) - 2 * p
    assert not lang.proves_nonneg(d, rng) and lang.proves_nonneg(d, rng, facts=(d,))
