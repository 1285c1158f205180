"""Shared by the test modules: reference evaluation of generated kernels, data for a layer,
compiling C in a test, the repository's place."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from vggen.compiler.emit import VGG_SPECIALISE
from vggen.derive.autodiff import derive
from vggen.derive.winograd import FLOAT32_BOUND
from vggen.frontend.lang import Equation, Layer, Max, Role, Sum, Tensor, indices
from vggen.frontend.layers import (
    EPS,
    HO,
    IC,
    OC,
    WO,
    B,
    C,
    H,
    K,
    S,
    W,
)
from vggen.frontend.zoo import CG, G, OG, leaky_relu  # noqa: F401 - leaky_relu: the tests' LeakyReLU
from vggen.proof.evaluate import Evaluator, run_forward

REPO = Path(__file__).resolve().parent.parent
CC = shutil.which("cc") or shutil.which("gcc")
SIZE_SYMBOLS = {s.name: s for s in (B, C, IC, OC, H, W, HO, WO, K, S, G, CG, OG)}
RTOL, ATOL = 1e-4, 1e-5

needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


# --------------------------------------------------------------------------- helpers


def compile_c(text: str, where: Path, name: str = "kernels", flags: tuple = ("-O2",)) -> ctypes.CDLL:
    src = where / f"{name}.c"
    src.write_text(text)
    lib = where / f"{name}.so"
    subprocess.run([CC, *flags, "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib), "-lm"],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def concrete(exprs, sizes: dict) -> tuple:
    subs = {SIZE_SYMBOLS[n]: v for n, v in sizes.items() if n in SIZE_SYMBOLS}
    return tuple(int(sp.sympify(e).xreplace(subs)) for e in exprs)


def kernel_arguments(gk, env: dict, sizes: dict) -> tuple[list, dict]:
    """A generated kernel's arguments in signature order: ``ctypes.c_int`` sizes and
    C-contiguous host arrays, the tensors read taken from ``env``, the written ones
    pre-filled with NaN / a sentinel (so an unwritten element shows) and also
    returned by name."""
    args, outs = [], {}
    for a in gk.ir.args:
        if a.kind == "size":
            args.append(ctypes.c_int(sizes[a.name]))
            continue
        shape = concrete(a.tensor.shape, sizes)
        dtype = np.int32 if a.dtype == "int32" else np.float32
        if a.access == "read":
            arr = np.ascontiguousarray(env[a.name], dtype=dtype)
            assert arr.shape == shape, (gk.name, a.name, arr.shape, shape)
        else:
            arr = np.full(shape, -12345 if dtype is np.int32 else np.nan, dtype=dtype)
            outs[a.name] = arr
        args.append(arr)
    return args, outs


def call_c(lib, gk, env: dict, sizes: dict) -> dict:
    """Run one generated C kernel on ``env``; the tensors it writes, by name."""
    args, outs = kernel_arguments(gk, env, sizes)
    fn = getattr(lib, gk.name)
    fn.restype = None
    fn(*[a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray) else a for a in args])
    return outs


def consts_for(sizes: dict, specialise: dict) -> dict:
    out = {SIZE_SYMBOLS[n]: v for n, v in sizes.items() if n in SIZE_SYMBOLS}
    out.update({K: specialise.get("K", 1), S: specialise.get("S", 2), EPS: specialise.get("epsilon", 2e-5)})
    return out


def reference(gk, env: dict, sizes: dict, specialise: dict) -> dict:
    """The kernel's equations evaluated by NumPy (float64) on the same inputs,
    stage by stage, from the source (unspecialised) equations."""
    consts = consts_for(sizes, specialise)
    lower_ = {name: concrete(t.lower, sizes) for name, t in gk.ir.tensors.items()}
    ref_env = {k: np.asarray(v, dtype=np.int64 if np.asarray(v).dtype.kind == "i" else np.float64)
               for k, v in env.items()}
    ev = Evaluator(ref_env, consts, lower_)
    out = {}
    for stage in gk.ir.stages:
        t = stage.tensor
        val = ev.equation(stage.equation, concrete(t.shape, sizes), lower_[t.name])
        ref_env[t.name] = val.astype(np.int64 if t.dtype == "int" else np.float64)
        out[t.name] = ref_env[t.name]
    return out


def layer_data(layer: Layer, sizes: dict, specialise: dict, rng) -> dict:
    """Every tensor of the layer and of its backward: random inputs, parameters
    and seeds (float32), the rest computed by the reference and rounded to
    float32, so each kernel is checked on consistent data."""
    consts = consts_for(sizes, specialise)
    env = {}
    for t in layer.tensors:
        if t.role not in (Role.INPUT, Role.PARAMETER):
            continue
        shape = concrete(t.shape, consts_sizes(consts))
        if t.dtype == "int":
            env[t.name] = rng.integers(0, sizes.get("C", 2), size=shape).astype(np.int64)
        elif not t.differentiable:            # a mask: 0 or 1/(1-p)
            env[t.name] = rng.choice([0.0, 2.0], size=shape).astype(np.float32).astype(np.float64)
        else:
            env[t.name] = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
    env = _round32(run_forward(layer, env, consts))
    bw = derive(layer)
    for seed in bw.seeds:
        shape = concrete(seed.shape, consts_sizes(consts))
        env[seed.name] = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
    env = _round32(run_forward(bw.program, env, consts))
    return env


def consts_sizes(consts: dict) -> dict:
    return {s.name: v for s, v in consts.items() if s.name in SIZE_SYMBOLS}


def _round32(env: dict) -> dict:
    return {k: (v.astype(np.float32).astype(np.float64) if np.asarray(v).dtype.kind == "f" else v)
            for k, v in env.items()}


def check_layer_kernels(lib, kernels, layer, sizes, specialise=VGG_SPECIALISE, seed=0) -> list[str]:
    """Run every kernel of ``layer`` and compare with the reference; returns the names checked."""
    rng = np.random.default_rng(seed)
    env = layer_data(layer, sizes, specialise, rng)
    checked = []
    for gk in kernels:
        if gk.ir.layer != layer.name:
            continue
        got = call_c(lib, gk, env, sizes)
        want = reference(gk, env, sizes, specialise)
        assert set(got) == set(want)
        for name, arr in got.items():
            if arr.dtype.kind == "i":
                np.testing.assert_array_equal(arr, want[name], err_msg=f"{gk.name}: {name}")
            elif gk.algorithm is not None:       # Winograd: its float32 error, relative to the output's scale
                bound = FLOAT32_BOUND[gk.algorithm["tile"]] * np.max(np.abs(want[name]))
                np.testing.assert_allclose(arr, want[name], rtol=0, atol=bound, err_msg=f"{gk.name}: {name}")
            else:
                np.testing.assert_allclose(arr, want[name], rtol=RTOL, atol=ATOL, err_msg=f"{gk.name}: {name}")
        checked.append(gk.name)
    return checked


# --------------------------------------------------------------------------- fixtures
# (LeakyReLU, imported above, is the zoo's: vggen.frontend.zoo.leaky_relu)


def row_logsumexp():
    """Many short rows: a max and a sum per (b, c) over w, so one thread per row."""
    b, c, w = indices("b c w")
    x = Tensor("x", (B, C, W), Role.INPUT)
    mx = Tensor("mx", (B, C), Role.SAVED, differentiable=False)
    y = Tensor("y", (B, C), Role.OUTPUT)
    return Layer("RowLogSumExp", [x, mx, y], [
        Equation(mx[b, c], Max(x[b, c, w], (w, 0, W))),
        Equation(y[b, c], sp.log(Sum(sp.exp(x[b, c, w] - mx[b, c]), (w, 0, W))) + mx[b, c]),
    ])


def assert_close(got, want, what: str, rtol: float, atol: float) -> None:
    """|got − want| ≤ rtol·|want| + atol·max(1, max|want|); integers exactly."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if want.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)
