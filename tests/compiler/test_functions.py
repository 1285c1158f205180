"""The closed set of functions (vggen/frontend/functions.py), the stability of
derived backwards, generated names clear of the users', sizes in 64 bits.

Elementwise layers outside VGG — tanh, σ, swish in both spellings (x·σ(x)
and x/(1 + e^−x)), GELU (erf), softplus (the function and log(1 + e^x)),
ELU, leaky ReLU, cosh/sinh, and σ and tanh kept as saved tensors — are
derived, their gradients compared with PyTorch autograd in float64, their
C kernels with the NumPy reference on odd shapes, their CUDA compiled with
nvcc and run in the CPU emulation; in float32 at |x| up to 100 their
derived backward must be within 10× PyTorch's own float32 error of a
float64 reference, and finite wherever the forward is.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp

from tests.compiler.test_cuda_compile import _compile_all, needs_nvcc
from tests.helpers import (
    REPO,
    call_c,
    check_layer_kernels,
    compile_c,
    needs_cc,
    reference,
)
from vggen.compiler.emit import generate
from vggen.compiler.targets.c.printer import CPrinter
from vggen.compiler.targets.cuda.printer import CudaPrinter
from vggen.compiler.targets.names import identifier
from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend import zoo
from vggen.frontend.functions import FUNCTIONS, sigmoid, softplus
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices, sizes
from vggen.frontend.layers import (
    EPS,
    IC,
    OC,
    B,
    C,
    H,
    W,
    b,
    c,
    elementwise_activation,
    i,
    j,
)
from vggen.proof.evaluate import run_forward

torch = pytest.importorskip("torch")
F = torch.nn.functional

SPECIALISE = {"K": 1, "S": 2, "epsilon": 1e-5}
ODD = [dict(B=2, C=3, H=5, W=7), dict(B=1, C=5, H=3, W=1)]


def saved(name, define, out) -> Layer:
    """s = define(x) kept as a saved tensor, y = out(x, s)."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    s = Tensor("s", (B, C, H, W), Role.SAVED)
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    X, S = x[b, c, i, j], s[b, c, i, j]
    return Layer(name, [x, s, y], [Equation(S, define(X)), Equation(y[b, c, i, j], out(X, S))])


# name → (layer, the same function in PyTorch); the zoo's where it has the layer
ACTIVATIONS = {
    "Tanh": (zoo.tanh, torch.tanh),
    "Sigmoid": (zoo.sigmoid, torch.sigmoid),
    "SigmoidExp": (lambda: elementwise_activation("SigmoidExp", lambda v: 1 / (1 + sp.exp(-v))), torch.sigmoid),
    "SwishMul": (lambda: elementwise_activation("SwishMul", lambda v: v * sigmoid(v)), F.silu),
    "SiLU": (zoo.silu, F.silu),                                  # x/(1 + e^−x)
    "GELU": (zoo.gelu, F.gelu),
    "Softplus": (zoo.softplus, F.softplus),
    "SoftplusLog": (lambda: elementwise_activation("SoftplusLog", lambda v: sp.log(1 + sp.exp(v))), F.softplus),
    "ELU": (zoo.elu, F.elu),
    "LeakyReLU": (zoo.leaky_relu, lambda t: F.leaky_relu(t, 0.1)),
    "CoshSinh": (lambda: elementwise_activation("CoshSinh", lambda v: sp.cosh(v) / 2 + sp.sinh(v)),
                 lambda t: torch.cosh(t) / 2 + torch.sinh(t)),
    "SwishSaved": (lambda: saved("SwishSaved", sigmoid, lambda x, s: x * s), F.silu),
    "TanhSaved": (lambda: saved("TanhSaved", sp.tanh, lambda x, s: s), torch.tanh),
}


def layers():
    return [make() for make, _ in ACTIVATIONS.values()]


def consts(shape: dict) -> dict:
    from tests.helpers import SIZE_SYMBOLS

    return {SIZE_SYMBOLS[k]: v for k, v in shape.items()} | {EPS: SPECIALISE["epsilon"]}


def torch_grad(fn, x: np.ndarray, dtype, **kw) -> np.ndarray:
    t = torch.tensor(x, dtype=dtype, requires_grad=True)
    fn(t, **kw).sum().backward()
    return t.grad.numpy()


def reference64(name: str, x: np.ndarray) -> np.ndarray:
    """∂/∂x of the activation in float64 (softplus without PyTorch's linear
    cut-off above 20, which is itself an approximation there)."""
    fn = ACTIVATIONS[name][1]
    if fn is F.softplus:
        return torch_grad(F.softplus, x, torch.float64, threshold=1000)
    return torch_grad(fn, x, torch.float64)


# --------------------------------------------------------------------------- the table


def test_every_function_has_every_form():
    """One table: each entry a SymPy class, a NumPy form, a C and a CUDA
    spelling; the helpers it names defined; the README lists them."""
    from vggen.compiler.targets.base import function_helpers

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Adding a layer"):]
    for f in FUNCTIONS:
        assert callable(f.numpy) and f.c and f.cuda, f.name
        if f.c.startswith("vg_"):
            (text,) = function_helpers({f.c}, "static inline")
            assert f"float {f.c}(" in text
        assert f"`{f.name}`" in section, f"README does not list {f.name}"


# every entry as an elementwise forward, on data inside its domain
TABLE_LAYERS = {
    "exp": lambda v: sp.exp(v),
    "log": lambda v: sp.log(v * v + 1) + sp.log(v * v + sp.Rational(1, 2)),   # log1pf and logf
    "pow": lambda v: (v * v + 1) ** sp.Rational(3, 2) + (v * v + 1) ** -3 + sp.sqrt(v * v + 2) + v ** 4,
    "abs": lambda v: sp.Abs(v),
    "min": lambda v: sp.Min(v, sp.Rational(1, 4)),
    "max": lambda v: sp.Max(v, -sp.Rational(1, 4), v * v - 1),
    "tanh": sp.tanh, "cosh": sp.cosh, "sinh": sp.sinh, "sin": sp.sin, "cos": sp.cos, "erf": sp.erf,
    "sigmoid": sigmoid, "softplus": softplus,
    "sign": lambda v: sp.sign(v),
    "heaviside": lambda v: sp.Heaviside(v) + sp.Heaviside(v, 0),
}


@needs_cc
def test_each_function_prints_as_it_evaluates(tmp_path):
    """Forward and backward of each table entry: the C kernels equal the
    NumPy evaluator (both read the table), and the CUDA ones compile."""
    assert set(TABLE_LAYERS) == {f.name for f in FUNCTIONS}
    table = [elementwise_activation(f"F{name}", f) for name, f in TABLE_LAYERS.items()]
    text, kernels = generate(table, "c", SPECIALISE)
    lib = compile_c(text, tmp_path)
    checked = []
    for n, layer in enumerate(table):
        for shape in ODD:
            checked += check_layer_kernels(lib, kernels, layer, shape, SPECIALISE, seed=n)
    assert set(checked) == {k.name for k in kernels}
    for name in ("vg_sigmoid", "vg_softplus", "vg_sign", "vg_heaviside", "log1pf(", "erff(", "powf("):
        assert name in text, name


@needs_nvcc
def test_each_function_compiles_with_nvcc(tmp_path):
    table = [elementwise_activation(f"F{name}", f) for name, f in TABLE_LAYERS.items()]
    text, kernels = generate(table, "cuda", SPECIALISE)
    assert "static __device__ __forceinline__ float vg_sigmoid(float x)" in text
    (cubin,) = _compile_all({"functions": text}, tmp_path).values()
    assert all(k.name.encode() + b"\0" in cubin for k in kernels)


def test_an_unknown_function_is_an_error_naming_it_and_the_equation():
    bad = elementwise_activation("Gamma", sp.gamma)
    equation = "y[b, c, i, j] = gamma(x[b, c, i, j])"
    for target in ("c", "cuda"):
        with pytest.raises(VggenError, match=r"\bgamma \(") as err:
            generate([bad], target, SPECIALISE)
        assert equation in str(err.value)
    with pytest.raises(VggenError, match=r"function gamma \(") as err:
        run_forward(bad, {"x": np.ones((1, 1, 1, 1))}, consts(dict(B=1, C=1, H=1, W=1)))
    assert equation in str(err.value)
    # the printers print none outside the table either (SymPy's C99 printer would: tgammaf)
    v = sp.Symbol("v", real=True)
    for printer in (CPrinter({}), CudaPrinter({})):
        with pytest.raises(VggenError, match="function gamma"):
            printer.code(sp.gamma(v))
        with pytest.raises(VggenError, match="function f"):
            printer.code(sp.Function("f")(v))


# --------------------------------------------------------------------------- derivation


def test_backwards_keep_to_the_forwards_functions():
    """No cosh from tanh or σ, σ from the exp spellings, the saved tensor read
    where the forward kept it."""
    g = {name: str(derive(make()).gradients[0].equation.rhs) for name, (make, _) in ACTIVATIONS.items()}
    assert g["Tanh"] == "(1 - tanh(x[b, c, i, j])**2)*g_y[b, c, i, j]"
    for name in ("Sigmoid", "SigmoidExp", "SwishMul", "SiLU", "Softplus", "SoftplusLog"):
        assert "sigmoid(x[b, c, i, j])" in g[name] and "exp" not in g[name] and "cosh" not in g[name], g[name]
    assert g["SwishSaved"].count("s[b, c, i, j]") >= 2 and "sigmoid" not in g["SwishSaved"]
    assert g["TanhSaved"] == "(1 - s[b, c, i, j]**2)*g_y[b, c, i, j]"
    assert "exp(x[b, c, i, j])" in g["ELU"]            # e^x alone stays e^x


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradient_equals_pytorch_in_float64(name):
    layer = ACTIVATIONS[name][0]()
    shape = dict(B=2, C=3, H=4, W=5)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5)) * 3
    env = run_forward(layer, {"x": x}, consts(shape))
    bw = derive(layer)
    env["g_y"] = np.ones_like(x)
    got = run_forward(bw.program, env, consts(shape))["g_x"]
    np.testing.assert_allclose(got, reference64(name, x), rtol=1e-11, atol=1e-13)


# --------------------------------------------------------------------------- kernels


@needs_cc
def test_c_kernels_match_the_reference(tmp_path):
    text, kernels = generate(layers(), "c", SPECIALISE)
    lib = compile_c(text, tmp_path)
    checked = []
    for n, layer in enumerate(layers()):
        for shape in ODD:
            checked += check_layer_kernels(lib, kernels, layer, shape, SPECIALISE, seed=n)
    assert set(checked) == {k.name for k in kernels}


@needs_nvcc
def test_cuda_kernels_compile(tmp_path):
    text, kernels = generate(layers(), "cuda", SPECIALISE)
    (cubin,) = _compile_all({"activations": text}, tmp_path).values()
    assert all(k.name.encode() + b"\0" in cubin for k in kernels)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from tests.compiler.test_cuda_emulation import CXX, compile_emulation

    if CXX is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    text, kernels = generate(layers(), "cuda", SPECIALISE)
    return compile_emulation(text, kernels, tmp_path_factory.mktemp("emu_fn")), kernels


def test_cuda_kernels_match_the_reference_in_emulation(emulated):
    from tests.compiler.test_cuda_emulation import _check, _run
    from tests.helpers import layer_data

    lib, kernels = emulated
    for n, layer in enumerate(layers()):
        env = layer_data(layer, ODD[0], SPECIALISE, np.random.default_rng(n))
        for gk in kernels:
            if gk.ir.layer == layer.name:
                _check(gk, _run(lib, gk, env, ODD[0], 2), reference(gk, env, ODD[0], SPECIALISE), "emulated")


# --------------------------------------------------------------------------- float32 stability

# large magnitudes on purpose; no 0 (leaky ReLU's gradient there is a convention)
LARGE = np.array([-100, -50, -20, -9, -3, -1, -0.25, -1e-3, 1e-3, 0.25, 1, 3, 9, 20, 50, 100], dtype=np.float32)
F32 = np.finfo(np.float32)


def _run_layer32(run, kernels, layer, x: np.ndarray) -> tuple[dict, np.ndarray]:
    """The layer's forward kernels, then its backward with ∂L/∂y = 1, all in
    float32 (``run(gk, env)`` runs one kernel): its tensors, and ∂L/∂x."""
    env = {"x": x}
    for direction in ("forward", "backward"):
        if direction == "backward":
            env["g_y"] = np.ones_like(x)
        for gk in kernels:
            if gk.ir.layer == layer.name and gk.ir.direction == direction:
                env.update(run(gk, env))
    return env, env["g_x"]


def _check_stable(name: str, env: dict, got: np.ndarray, x: np.ndarray):
    ref = reference64(name, x.astype(np.float64))
    fn = ACTIVATIONS[name][1]
    torch32 = torch_grad(fn, x, torch.float32).astype(np.float64)
    finite = np.isfinite(env["y"])           # where the forward is finite …
    assert np.all(np.isfinite(got[finite])), (name, x[finite & ~np.isfinite(got)])
    scale = np.maximum(np.abs(ref), F32.tiny)
    ours, theirs = np.abs(got - ref) / scale, np.abs(torch32 - ref) / scale
    bad = finite & (ours > 10 * np.maximum(theirs, F32.eps))      # … within 10× PyTorch's error
    assert not bad.any(), (name, x[bad], got[bad], ref[bad], torch32[bad])
    return ours[finite].max(), theirs[finite].max()


def _stability(run, kernels):
    x = np.broadcast_to(LARGE, (2, 1, 1, len(LARGE))).copy()
    x[1] *= -1
    errors = {}
    for layer in layers():
        env, got = _run_layer32(run, kernels, layer, x)
        errors[layer.name] = _check_stable(layer.name, env, got, x)
        at = {float(v): float(g) for v, g in zip(x[0].ravel(), got[0].ravel())}
        if layer.name.startswith("Swish") or layer.name == "SiLU":
            assert at[50.0] == pytest.approx(1.0, rel=1e-6) and at[-100.0] == pytest.approx(0.0, abs=1e-30)
        if layer.name.startswith("Tanh"):
            assert at[20.0] == pytest.approx(0.0, abs=1e-15) and at[-20.0] == pytest.approx(0.0, abs=1e-15)
        if layer.name.startswith("Softplus"):
            assert at[100.0] == 1.0
    return errors


@needs_cc
def test_backward_is_stable_in_float32_in_c(tmp_path):
    text, kernels = generate(layers(), "c", SPECIALISE)
    lib = compile_c(text, tmp_path)
    shape = dict(B=2, C=1, H=1, W=len(LARGE))
    errors = _stability(lambda gk, env: call_c(lib, gk, env, shape), kernels)
    print({k: (f"{a:.1e}", f"{b:.1e}") for k, (a, b) in errors.items()})


def test_backward_is_stable_in_float32_in_cuda_emulation(emulated):
    from tests.compiler.test_cuda_emulation import _run

    lib, kernels = emulated
    shape = dict(B=2, C=1, H=1, W=len(LARGE))
    _stability(lambda gk, env: _run(lib, gk, env, shape, 1), kernels)


# --------------------------------------------------------------------------- names


def clash_layers():
    """Indices named like the tiled template's locals and the letters it builds
    names from, tensors and sizes named like the targets' library names."""
    k, r, t, n, m, p, q, tile, acc = indices("k r t n m p q tile acc")
    free = Tensor("free", (B, IC), Role.INPUT)
    thread = Tensor("threadIdx", (IC, C), Role.PARAMETER)
    out = Tensor("expf", (B, C), Role.OUTPUT)
    product = Layer("ClashProduct", [free, thread, out],
                    [Equation(out[k, r], Sum(free[k, t] * thread[t, r], (t, 0, IC)))])
    x = Tensor("float4", (B, IC, H, W), Role.INPUT, zero_outside=True)
    w = Tensor("min", (OC, IC, 3, 3), Role.PARAMETER, lower=(0, 0, -1, -1))
    y = Tensor("size_t", (B, OC, H, W), Role.OUTPUT)
    conv = Layer("ClashConv", [x, w, y], [Equation(
        y[n, tile, i, j], Sum(w[tile, acc, p, q] * x[n, acc, i + p, j + q], (acc, 0, IC), (p, -1, 2), (q, -1, 2)))])
    s = Tensor("sqrtf", (B, C, H, W), Role.SAVED)
    z = Tensor("y", (B, C, H, W), Role.OUTPUT)
    v = Tensor("x", (B, C, H, W), Role.INPUT)
    act = Layer("ClashAct", [v, s, z], [Equation(s[m, k, r, t], sigmoid(v[m, k, r, t])),
                                        Equation(z[m, k, r, t], v[m, k, r, t] * s[m, k, r, t])])
    return [product, conv, act]


def test_user_names_are_mapped_clear_of_the_targets():
    assert identifier("free") == "vg_u_free" and identifier("VG_THREADS") == "vg_u_VG_THREADS"
    assert identifier("k") == "k" and identifier("acc") == "acc" and identifier("tile") == "tile"
    text, kernels = generate(clash_layers(), "cuda", SPECIALISE)
    assert {k.tiled is not None for k in kernels} == {True, False}
    # the manifest keeps the names as written; the code spells the clashing ones vg_u_*
    assert [a.name for a in kernels[0].ir.args][:2] == ["free", "threadIdx"]
    assert "const float *__restrict__ vg_u_free" in text and "vg_u_threadIdx[" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    assert not re.search(r"(?<![\w.])(free|float4|size_t|sqrtf|expf|min)\[", code)


# a declaration in C or CUDA: the declared name
DECLARED = re.compile(r"\b(?:int|float|bool|unsigned int|long long|float4|float2|size_t)\b\s*(?:const\s+)?\**\s*"
                      r"(?:const\s+)?(?:__restrict__\s+|restrict\s+)?([A-Za-z_]\w*)")


@pytest.mark.parametrize("target", ["c", "cuda"])
def test_kernels_declare_only_their_own_names_and_the_users(target):
    """Every name a kernel's code declares is the target's (``vg_*``, ``VG_*``;
    the IR's ``acc_*``, ``v_*``, ``best_*``, ``arg_*`` locals, the ``_k*``
    indices of split sums) or a user's index, tensor or size."""
    from vggen.frontend.layers import network_layers

    for group in (clash_layers(), network_layers(), layers()):
        _, kernels = generate(group, target, SPECIALISE)
        for g in kernels:
            loops = list(g.ir.loops())
            loops += g.schedule.gemm.k if getattr(g.schedule, "gemm", None) else []
            loops += g.tiled.m + g.tiled.n + g.tiled.k if g.tiled is not None else []
            users = {identifier(n) for n in [lp.var.name for lp in loops] + [a.name for a in g.ir.args]}
            code = "\n".join(line.split("//")[0] for line in g.text.splitlines())
            odd = {n for n in DECLARED.findall(code)
                   if not n.startswith(("vg_", "VG_", "acc_", "v_", "best_", "arg_", "_k"))} - users
            assert not odd, (g.name, sorted(odd))


@needs_cc
def test_clashing_names_run_in_c(tmp_path):
    text, kernels = generate(clash_layers(), "c", SPECIALISE)
    lib = compile_c(text, tmp_path)
    for n, layer in enumerate(clash_layers()):
        for shape in (dict(B=2, C=3, IC=4, OC=5, H=5, W=3), dict(B=1, C=1, IC=2, OC=1, H=1, W=2)):
            assert check_layer_kernels(lib, kernels, layer, shape, SPECIALISE, seed=n)


@needs_nvcc
def test_clashing_names_compile_with_nvcc(tmp_path):
    """Indices k and r once gave ``"vg_b_k" has already been declared`` in the
    tiled template; sizes named like its template parameters and macros too."""
    BM, TN, VG = sizes("BM TN VG_THREADS")
    k, r, t = indices("k r t")
    a = Tensor("a", (BM, VG), Role.INPUT)
    bt = Tensor("b", (VG, TN), Role.PARAMETER)
    y = Tensor("acc", (BM, TN), Role.OUTPUT)
    odd = Layer("OddSizes", [a, bt, y], [Equation(y[k, r], Sum(a[k, t] * bt[t, r], (t, 0, VG)))])
    text, kernels = generate(clash_layers() + [odd], "cuda", SPECIALISE)
    (cubin,) = _compile_all({"clash": text}, tmp_path).values()
    for g in kernels:
        assert g.name.encode() + b"\0" in cubin
        if g.fallback:
            assert g.fallback.encode() + b"\0" in cubin


def test_clashing_names_run_in_cuda_emulation(tmp_path):
    from tests.compiler.test_cuda_emulation import CXX, _check, _run, compile_emulation
    from tests.helpers import layer_data

    if CXX is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    text, kernels = generate(clash_layers(), "cuda", SPECIALISE)
    lib = compile_emulation(text, kernels, tmp_path)
    shape = dict(B=2, C=3, IC=4, OC=5, H=5, W=3)
    for n, layer in enumerate(clash_layers()):
        env = layer_data(layer, shape, SPECIALISE, np.random.default_rng(n))
        for gk in kernels:
            if gk.ir.layer == layer.name:
                _check(gk, _run(lib, gk, env, shape, 3), reference(gk, env, shape, SPECIALISE), "clash")


# --------------------------------------------------------------------------- sizes in 64 bits


def layer_norm() -> Layer:
    """Normalisation over (c, i, j) per sample, no scale or shift."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    mu = Tensor("mu", (B,), Role.SAVED)
    var = Tensor("var", (B,), Role.SAVED)
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    red = ((c, 0, C), (i, 0, H), (j, 0, W))
    return Layer("LayerNorm", [x, mu, var, y], [
        Equation(mu[b], Sum(x[b, c, i, j], *red) / (C * H * W)),
        Equation(var[b], Sum((x[b, c, i, j] - mu[b]) ** 2, *red) / (C * H * W)),
        Equation(y[b, c, i, j], (x[b, c, i, j] - mu[b]) / sp.sqrt(var[b] + EPS)),
    ], constants={EPS: 1e-5})


def test_size_products_that_can_pass_2_31_print_in_64_bits():
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    big = Tensor("big", (3, 2 ** 30), Role.INPUT)
    p = CPrinter({"x": x, "big": big})
    acc = sp.Symbol("acc", real=True)
    assert p.code(acc / (B * H * W)) == "acc/(B*H*W)"              # ≤ x's elements: as before
    assert p.code(3 * acc / (C ** 2 * H ** 2 * W ** 2)) == "3*acc/(float)((long long)C*C*H*H*W*W)"
    assert p.code(2 * C * H * W * acc) == "acc*(float)((long long)2*C*H*W)"
    assert p.code(sp.Integer(1) / (C * H * W * B * B)) == "((float)(1)/(((long long)B*B*C*H*W)))"
    assert p.code(x[b, c, i, j]) == "x[W*(H*(C*b + c) + i) + j]"
    assert "(long long)" in p.code(big[i, j])                      # 3·2³⁰ elements: 64-bit offsets


@needs_cc
def test_a_normalisation_over_33x32x32_matches_float64(tmp_path):
    """C = 33, H = W = 32: (CHW)² passes 2³¹, where the expanded backward divided by it;
    the per-sample sums are now reductions of their own, computed once."""
    layer = layer_norm()
    text, kernels = generate([layer], "c", SPECIALISE)
    assert "g_x_sum1[b]" in text and "C*C*H*H*W*W" not in text
    lib = compile_c(text, tmp_path)
    shape = dict(B=2, C=33, H=32, W=32)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 33, 32, 32)) * 2 + 1).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    env = {"x": x}
    for direction in ("forward", "backward"):
        if direction == "backward":
            env["g_y"] = gy
        for gk in kernels:
            if gk.ir.direction == direction:
                env.update(call_c(lib, gk, env, shape))
    t = torch.tensor(x.astype(np.float64), requires_grad=True)
    mu = t.mean(dim=(1, 2, 3), keepdim=True)
    var = ((t - mu) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    ((t - mu) / torch.sqrt(var + 1e-5) * torch.tensor(gy.astype(np.float64))).sum().backward()
    want = t.grad.numpy()
    err = np.abs(env["g_x"] - want).max() / np.abs(want).max()
    print(f"layer norm ∂L/∂x: relative error {err:.2e}")
    assert err < 1e-5
