"""The layer zoo (vggen/frontend/zoo.py): every entry derived, compiled and run
on every target, at odd shapes.

Per layer:

* ``derive`` gives a gradient for every differentiable input, applying only
  the table's functions;
* the numpy target (float64) equals PyTorch's autograd in float64 (the torch
  twin of each layer is written here, ``TORCH``), and
  ``torch.autograd.gradcheck`` passes on it (``vggen.torch``, tiny shapes);
* the c target (float32) equals the numpy target, forward and backward, within
  |c − ref| ≤ RTOL·|ref| + ATOL·max(1, max|ref|) (as tests/runtime/test_compile_api.py);
* the CUDA of all the layers, in one file, compiles with nvcc once, and runs in
  the CPU emulation (tests/compiler/test_cuda_emulation.py) against the NumPy
  reference;
* float32 stability: on inputs of large magnitude and mean (x = 1000 + 50·N(0,1);
  activations at |x| up to 60) the c gradient's error against float64 is at
  most 10× PyTorch's own float32 error, plus a few float32 ulps of the largest
  gradient (so that an exact PyTorch does not make the bound 0).

A layer vggen cannot yet derive or compile is marked in ``BROKEN`` (strict: the
mark must go when it is fixed).
"""

from __future__ import annotations

import inspect
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import sympy as sp

import vggen
from tests.compiler.test_cuda_compile import NVCC, compile_cubin, needs_nvcc
from tests.compiler.test_cuda_emulation import CXX, _check, _run, compile_emulation
from tests import helpers
from tests.helpers import CC, layer_data, reference
from vggen.compiler.emit import render
from vggen.compiler.pipeline import lower_network
from vggen.derive import autodiff
from vggen.frontend import zoo
from vggen.frontend.functions import unknown_function
from vggen.frontend.lang import Layer, Role
from vggen.frontend.zoo import ZOO

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import vggen.torch  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

# --------------------------------------------------------------------------- the torch twins and the shapes

TORCH = {
    "conv3x3_s2": lambda x, w: F.conv2d(x, w, stride=2, padding=1),
    "conv5x5_s2": lambda x, w: F.conv2d(x, w, stride=2, padding=2),
    "conv2x2_s2": lambda x, w: F.conv2d(x, w, stride=2),
    "conv3x3_dilated": lambda x, w: F.conv2d(x, w, padding=2, dilation=2),
    "depthwise_conv3x3": lambda x, w: F.conv2d(x, w[:, None], padding=1, groups=w.shape[0]),
    "grouped_conv3x3": lambda x, w: F.conv2d(x, w, padding=1, groups=x.shape[1] // w.shape[1]),
    "avgpool2x2": lambda x: F.avg_pool2d(x, 2),
    "global_avgpool": lambda x: x.mean(dim=(2, 3)),
    "maxpool3x3_s2": lambda x: F.max_pool2d(x, 3, stride=2),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gelu": F.gelu,
    # softplus itself: PyTorch's default turns linear above 20, an approximation there
    "softplus": lambda x: F.softplus(x, threshold=1000),
    "elu": F.elu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "sample_norm": lambda x, gamma, beta: F.group_norm(x, 1, gamma, beta, eps=1e-5),
    "group_norm": lambda x, gamma, beta: F.group_norm(x, ZOO["group_norm"].sizes["G"], gamma, beta, eps=1e-5),
    "mse_loss": lambda x, t: F.mse_loss(x, t).reshape(1),
    "l1_loss": lambda x, t: F.l1_loss(x, t).reshape(1),
    "residual_add": lambda x, r: x + r,
    "upsample2x": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
}
ACTIVATIONS = {"tanh", "sigmoid", "silu", "gelu", "softplus", "elu", "leaky_relu"}

# sizes by name: odd where the layer allows (x of a stride-2 3×3 convolution is 2·HO − 1 = 5 by 7)
ODD = dict(B=2, C=3, OC=5, H=5, W=7, HO=3, WO=4)
SIZES = {name: ODD for name in ZOO} | {
    "grouped_conv3x3": dict(B=2, G=3, CG=2, OG=2, H=5, W=7),
    "avgpool2x2": dict(B=2, C=3, HO=3, WO=5),
    "sample_norm": dict(B=3, C=3, H=3, W=5),               # small: the backward's sums may be O((CHW)²)
    "group_norm": dict(B=2, G=3, CG=2, H=3, W=5),
    "mse_loss": dict(B=5, C=7),
    "l1_loss": dict(B=5, C=7),
}
# gradcheck differentiates numerically element by element: tiny
TINY = {name: dict(B=1, C=2, OC=2, H=3, W=3, HO=2, WO=2) for name in ZOO} | {
    "grouped_conv3x3": dict(B=1, G=2, CG=1, OG=1, H=3, W=3),
    "maxpool3x3_s2": dict(B=1, C=1, HO=2, WO=2),
    "sample_norm": dict(B=1, C=2, H=2, W=2),
    "group_norm": dict(B=1, G=3, CG=1, H=1, W=3),
    "mse_loss": dict(B=2, C=3),
    "l1_loss": dict(B=2, C=3),
}
# not gradchecked here: the costliest, whose kind of window conv3x3_s2 covers, and those that
# tests/runtime/test_compile_api.py gradchecks already
GRADCHECK_SKIP = {"conv5x5_s2", "conv3x3_dilated", "conv2x2_s2", "depthwise_conv3x3", "avgpool2x2"}
# the CUDA file's fixed sizes: the entries' own (one G for both grouped layers) and the norms' ε
SPECIALISE = {"G": 3, "epsilon": zoo.NORM_EPSILON}

# vggen cannot yet derive or compile these (reported to the derivation's owner): every check of them fails
BROKEN: dict = {}      # name -> why, for a layer vggen cannot yet take (marked xfail, strict)


def params(extra: dict | None = None, skip=()) -> list:
    """Every ZOO name but those in ``skip``; those in BROKEN marked xfail(strict), those in
    ``extra`` (name -> mark) marked too."""
    out = []
    for name in ZOO:
        if name in skip:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=BROKEN[name])] if name in BROKEN else []
        if extra and name in extra:
            marks.append(extra[name])
        out.append(pytest.param(name, marks=marks))
    return out


def shape_of(t, sizes: dict) -> tuple:
    return tuple(int(sp.sympify(d).xreplace({s: sizes[s.name] for s in sp.sympify(d).free_symbols}))
                 for d in t.shape)


def given_tensors(layer: Layer) -> list:
    """The tensors a caller gives the forward, in the layer's order (``op.inputs``)."""
    return [t for t in layer.tensors if not t.role.is_computed]


def draw(layer: Layer, sizes: dict, seed: int, large: str | None = None) -> dict:
    """Inputs and parameters, float64 holding float32 values (both precisions see the same numbers).
    ``large``: "mean" makes the inputs 1000 + 50·N(0,1), "activation" ±(1e-3 … 60)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in given_tensors(layer):
        shape = shape_of(t, sizes)
        a = rng.standard_normal(shape)
        if t.role is Role.INPUT and large == "mean":
            a = 1000 + 50 * a
        elif t.role is Role.INPUT and large == "activation":
            a = np.sign(a) * 10.0 ** rng.uniform(-3, np.log10(60), shape)
        out[t.name] = a.astype(np.float32).astype(np.float64)
    return out


def seeds_for(op, forward: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"g_{n}": rng.standard_normal(forward[n].shape).astype(np.float32).astype(np.float64)
            for n in op.outputs}


def run_op(op, inputs: dict, seeds_seed: int, dtype) -> tuple[dict, dict, dict]:
    """(forward tensors, seeds, gradients of the differentiable inputs) of ``op`` on ``inputs``."""
    inputs = {n: a.astype(dtype) for n, a in inputs.items()}
    fwd = op.forward(**inputs)
    seeds = {n: a.astype(dtype) for n, a in seeds_for(op, fwd, seeds_seed).items()}
    every = {**inputs, **fwd, **seeds}
    # forward tensors the backward does not read still tell it sizes (a global pooling's H, W from x)
    given = {n: every[n] for n in every if n in op.backward_inputs or n in op.inputs}
    grads = op.backward(**given)
    return fwd, seeds, {n: grads[n] for n in (f"g_{d}" for d in op.differentiable)}


def torch_grads(name: str, inputs: dict, seeds: dict, dtype) -> tuple[list, dict]:
    """(outputs, gradients by g_<input>) of the torch twin, in ``dtype``."""
    tensors = {n: torch.tensor(a, dtype=dtype, requires_grad=True) for n, a in inputs.items()}
    out = TORCH[name](*tensors.values())
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(out, list(tensors.values()), [torch.tensor(s, dtype=dtype) for s in seeds.values()])
    return [o.detach().numpy() for o in out], {f"g_{n}": g.numpy() for n, g in zip(tensors, grads)}


def assert_close(got, want, what: str, rtol=RTOL, atol=ATOL) -> None:
    helpers.assert_close(got, want, what, rtol, atol)


pytestmark = pytest.mark.usefixtures("own_op_cache")


@pytest.fixture(scope="module", autouse=True)
def one_derivation_per_layer():
    """``derive`` is a function of a layer's equations, and this module would derive
    each zoo layer five times (its numpy and c ops, the CUDA file, the emulation's
    data): the later ones reuse the first (nothing downstream alters a Backward)."""
    import tests.helpers

    real, memo = autodiff.derive, {}

    def derive_once(layer):
        key = (layer.name, layer.direction, tuple(map(repr, layer.tensors)),
               tuple((t.lower, t.zero_outside, t.dtype, t.differentiable) for t in layer.tensors),
               tuple(map(str, layer.equations)), tuple(sorted(map(str, layer.constants.items()))))
        if key not in memo:
            memo[key] = real(layer)
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autodiff, "derive", derive_once)
        mp.setattr(tests.helpers, "derive", derive_once)
        yield


def compiled(name: str, target: str):
    entry = ZOO[name]
    return vggen.compile(entry.layer(), target, entry.sizes)


# --------------------------------------------------------------------------- the registry


def test_the_zoo_is_public_documented_and_torch_free():
    assert len(ZOO) >= 22 and set(TORCH) == set(ZOO) == set(SIZES)
    names = [entry.layer().name for entry in ZOO.values()]
    assert len(set(names)) == len(names), names
    for key, entry in ZOO.items():
        doc = entry.doc
        assert doc and "\n" not in doc, (key, doc)
        assert entry.torch and isinstance(entry.layer(), Layer), key
    # written through the front end only: no derivation, compiler or torch in the module
    source = inspect.getsource(zoo)
    imported = set(re.findall(r"^(?:from|import) (\S+)", source, re.MULTILINE))
    assert imported <= {"__future__", "collections.abc", "dataclasses", "sympy", "vggen.frontend.functions",
                        "vggen.frontend.lang", "vggen.frontend.layers"}, imported


# --------------------------------------------------------------------------- derive


@pytest.mark.parametrize("name", params())
def test_derive_gives_every_gradient_in_the_functions_table(name):
    layer = ZOO[name].layer()
    bw = autodiff.derive(layer)                  # the module's one derivation of it
    assert {g.of.name for g in bw.gradients} == {t.name for t in layer.differentiable_inputs}
    for eq in bw.program.equations:
        assert unknown_function(eq.rhs) is None, (str(eq), unknown_function(eq.rhs))


# --------------------------------------------------------------------------- CUDA: one file, nvcc once, emulation
#
# One file holds every zoo layer's kernels; nvcc and the emulation's C++
# compiler start on it as soon as it is written (an early test asks for it)
# and run beside the tests that follow; the tests at the end of the module
# wait for them.


@dataclass
class CudaBuild:
    text: str
    kernels: dict            # zoo name -> its generated kernels
    failed: dict             # zoo name -> why it has none
    cubin: Future | None     # nvcc's cubin (None: no nvcc)
    emulation: Future | None  # the emulation's ctypes library (None: no C++ compiler)


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    lowered, failed = {}, {}
    for name, entry in ZOO.items():
        try:
            lowered[name] = lower_network([entry.layer()], SPECIALISE)
        except Exception as e:   # noqa: BLE001 - the layer's own tests report it
            failed[name] = f"{type(e).__name__}: {e}"
    text, kernels = render([k for ks in lowered.values() for k in ks], "cuda")
    by_name = {g.name: g for g in kernels}
    where = tmp_path_factory.mktemp("zoo-cuda")
    src = where / "zoo.cu"
    src.write_text(text)
    with ThreadPoolExecutor(max_workers=2) as pool:       # two compilers, each in its own process
        yield CudaBuild(text, {n: [by_name[k.name] for k in ks] for n, ks in lowered.items()}, failed,
                        pool.submit(compile_cubin, src) if NVCC else None,
                        pool.submit(compile_emulation, text, kernels, where) if CXX else None)


@pytest.mark.parametrize("name", params())
def test_one_cuda_file_holds_every_layers_kernels(cuda_build, name):
    assert name not in cuda_build.failed, cuda_build.failed.get(name)
    kernels = cuda_build.kernels[name]
    assert {g.ir.direction for g in kernels} == {"forward", "backward"}
    for g in kernels:
        assert f"\n{g.name}(" in cuda_build.text, g.name        # defined, on its own line


# --------------------------------------------------------------------------- numpy (float64) and torch


@pytest.mark.parametrize("name", params())
def test_numpy_target_equals_torch_autograd_in_float64(name):
    op = compiled(name, "numpy")
    inputs = draw(op.layer, SIZES[name], seed=1)
    fwd, seeds, grads = run_op(op, inputs, 2, np.float64)
    outs, want = torch_grads(name, inputs, seeds, torch.float64)
    for n, o in zip(op.outputs, outs):
        assert_close(fwd[n], o, f"{name} {n}", rtol=1e-10, atol=1e-12)
    for n in grads:
        assert_close(grads[n], want[n], f"{name} {n}", rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", params(skip=GRADCHECK_SKIP))
def test_gradcheck_on_the_numpy_target(name):
    entry = ZOO[name]
    fn = vggen.torch.function(entry.layer(), "numpy", entry.sizes)
    arrays = draw(fn.op.layer, TINY[name], seed=3)
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays.values()]
    assert torch.autograd.gradcheck(fn.apply, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- c (float32) against numpy (float64)


@needs_cc
@pytest.mark.parametrize("name", params())
def test_c_forward_and_backward_equal_the_numpy_reference(name):
    op_c, op_np = compiled(name, "c"), compiled(name, "numpy")
    inputs = draw(op_c.layer, SIZES[name], seed=4)
    fwd_c, _, grads_c = run_op(op_c, inputs, 5, np.float32)
    fwd_np, _, grads_np = run_op(op_np, inputs, 5, np.float64)
    assert set(fwd_c) == set(fwd_np) == set(op_c.outputs + op_c.saved)
    for n in fwd_c:
        assert fwd_c[n].dtype == (np.int32 if fwd_c[n].dtype.kind == "i" else np.float32)
        assert_close(fwd_c[n], fwd_np[n], f"{name} forward {n}")
    assert set(grads_c) == set(grads_np) == {f"g_{t.name}" for t in op_c.layer.differentiable_inputs}
    for n in grads_c:
        assert_close(grads_c[n], grads_np[n], f"{name} backward {n}")


# --------------------------------------------------------------------------- float32 stability


F32_EPS = float(np.finfo(np.float32).eps)


@needs_cc
@pytest.mark.parametrize("name", params())
def test_c_gradients_in_float32_are_as_stable_as_pytorchs(name):
    op = compiled(name, "c")
    inputs = draw(op.layer, SIZES[name], seed=7, large="activation" if name in ACTIVATIONS else "mean")
    _, seeds, got = run_op(op, inputs, 8, np.float32)
    seeds = {n: a.astype(np.float64) for n, a in seeds.items()}
    _, ref = torch_grads(name, inputs, seeds, torch.float64)
    _, theirs = torch_grads(name, inputs, seeds, torch.float32)
    report = {}
    for n, g in got.items():
        ours = float(np.abs(g - ref[n]).max())
        pytorch = float(np.abs(theirs[n] - ref[n]).max())
        floor = 4 * F32_EPS * float(np.abs(ref[n]).max())
        report[n] = f"{ours:.1e} vs PyTorch {pytorch:.1e}"
        assert np.isfinite(g).all(), (name, n)
        assert ours <= 10 * pytorch + floor, (name, n, report[n], f"floor {floor:.1e}")
    print(name, report)


# --------------------------------------------------------------------------- CUDA: the compiled file


@needs_nvcc
@pytest.mark.parametrize("name", params())
def test_cuda_compiles_with_nvcc(cuda_build, name):
    cubin = cuda_build.cubin.result()
    assert name not in cuda_build.failed, cuda_build.failed.get(name)
    for g in cuda_build.kernels[name]:
        assert g.name.encode() + b"\0" in cubin, g.name
        if g.fallback:
            assert g.fallback.encode() + b"\0" in cubin, g.fallback


@pytest.mark.parametrize("name", params())
def test_cuda_runs_in_emulation_and_equals_the_reference(cuda_build, name):
    if cuda_build.emulation is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    lib = cuda_build.emulation.result()
    assert name not in cuda_build.failed, cuda_build.failed.get(name)
    sizes = SIZES[name]
    env = layer_data(ZOO[name].layer(), sizes, SPECIALISE, np.random.default_rng(6))
    for g in cuda_build.kernels[name]:
        want = reference(g, env, sizes, SPECIALISE)
        for grid in (2, 40):          # fewer blocks than outputs (striding); enough to split a reduction
            _check(g, _run(lib, g, env, sizes, grid), want, f"grid {grid}")
