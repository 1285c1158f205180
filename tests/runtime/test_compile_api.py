"""``vggen.compile`` and ``vggen.torch``: layers written through the front end
(VGG's own, and from the zoo, vggen/frontend/zoo.py: two activations, average
pooling, an MSE loss, a depthwise convolution, a residual add), compiled in
one call.

What is asserted, per layer, at odd shapes:

* the c target's forward and backward equal the numpy target's (the
  equations evaluated in float64) within TOL;
* ``torch.autograd.gradcheck`` passes on the numpy target in float64;
* on c in float32, outputs and gradients equal PyTorch's autograd of the same
  layer written in torch within TOL.

TOL (also in the README): |c − reference| ≤ RTOL·|reference| + ATOL·max(1, max|reference|),
RTOL = 1e-4, ATOL = 1e-5: float32 kernels that sum in their own order
against a float64 or float32 reference.  Then: the cache (a second compile
runs neither vggen's compiler nor cc; concurrent publication of one op),
one-line errors, and a small model trained through a vggen op.
"""

from __future__ import annotations

import re

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import vggen
from tests import helpers
from tests.helpers import REPO
from vggen import ops
from vggen.errors import VggenError
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices, sizes
from vggen.frontend.layers import (
    batch_normalization,
    batch_normalization_relu,
    convolution2d,
    dropout,
    linear,
    max_pooling2d,
    relu,
    softmax_cross_entropy,
)
from vggen.frontend.zoo import (
    average_pooling2x2,
    depthwise_convolution3x3,
    leaky_relu,
    mse_loss,
    residual_add,
    silu,
)

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import vggen.torch  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")

B, C = sizes("B C")
b, c, i = indices("b c i")


# --------------------------------------------------------------------------- a layer written here (the others: the zoo)


def repeat() -> Layer:
    """K only in the output's shape: the inputs cannot tell it."""
    K, = sizes("K")
    x = Tensor("x", (B, C), Role.INPUT)
    y = Tensor("y", (B, C, K), Role.OUTPUT)
    return Layer("Repeat", [x, y], [Equation(y[b, c, i], x[b, c])])


# --------------------------------------------------------------------------- cases


def _bn(x, gamma, beta):
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=2e-5)


@dataclass
class Case:
    layer: Callable[[], Layer]
    shapes: dict                   # input -> odd shape, for c against numpy and torch
    small: dict                    # input -> shape for gradcheck
    torch: Callable                # the same layer in torch: inputs by name -> outputs in order
    sizes: dict | None = None      # fixed at compile time
    ints: dict = field(default_factory=dict)     # integer input -> exclusive upper bound
    masks: tuple = ()              # non-differentiable float inputs (0 or 2)


CASES = {
    "conv": Case(convolution2d, dict(x=(2, 3, 5, 7), w=(5, 3, 3, 3)), dict(x=(1, 2, 3, 4), w=(2, 2, 3, 3)),
                 lambda x, w: (F.conv2d(x, w, padding=1),), sizes={"K": 1}),
    "linear": Case(linear, dict(x=(3, 7), w=(7, 5)), dict(x=(2, 3), w=(3, 5)), lambda x, w: (x @ w,)),
    "batchnorm": Case(batch_normalization, dict(x=(3, 5, 3, 7), gamma=(5,), beta=(5,)),
                      dict(x=(2, 3, 3, 1), gamma=(3,), beta=(3,)), lambda x, gamma, beta: (_bn(x, gamma, beta),)),
    "bn_relu": Case(batch_normalization_relu, dict(x=(3, 5, 3, 7), gamma=(5,), beta=(5,)),
                    dict(x=(3, 2, 1, 3), gamma=(2,), beta=(2,)),
                    lambda x, gamma, beta: (F.relu(_bn(x, gamma, beta)),)),
    "relu": Case(relu, dict(x=(2, 3, 5, 7)), dict(x=(1, 3, 1, 5)), lambda x: (F.relu(x),)),
    "dropout": Case(dropout, dict(x=(2, 3, 5, 7), R=(2, 3, 5, 7)), dict(x=(1, 3, 1, 5), R=(1, 3, 1, 5)),
                    lambda x, R: (R * x,), masks=("R",)),
    "maxpool": Case(max_pooling2d, dict(x=(3, 5, 6, 10)), dict(x=(1, 3, 4, 6)),
                    lambda x: (F.max_pool2d(x, 2),), sizes={"S": 2}),
    "softmax_ce": Case(softmax_cross_entropy, dict(x=(5, 7), t=(5,)), dict(x=(3, 5), t=(3,)),
                       lambda x, t: (F.cross_entropy(x, t.long(), reduction="none"),), ints={"t": 7}),
    "leaky_relu": Case(leaky_relu, dict(x=(2, 3, 5, 7)), dict(x=(1, 3, 1, 5)),
                       lambda x: (F.leaky_relu(x, 0.1),)),
    "silu": Case(silu, dict(x=(2, 3, 5, 7)), dict(x=(1, 3, 1, 5)), lambda x: (F.silu(x),)),
    "avgpool": Case(average_pooling2x2, dict(x=(3, 5, 6, 10)), dict(x=(1, 3, 4, 6)),
                    lambda x: (F.avg_pool2d(x, 2),)),
    "mse": Case(mse_loss, dict(x=(5, 7), t=(5, 7)), dict(x=(3, 5), t=(3, 5)),
                lambda x, t: (F.mse_loss(x, t).reshape(1),)),
    "depthwise": Case(depthwise_convolution3x3, dict(x=(2, 3, 5, 7), w=(3, 3, 3)), dict(x=(1, 2, 3, 4), w=(2, 3, 3)),
                      lambda x, w: (F.conv2d(x, w[:, None], padding=1, groups=w.shape[0]),)),
    "residual": Case(residual_add, dict(x=(2, 3, 5, 7), r=(2, 3, 5, 7)), dict(x=(1, 3, 1, 5), r=(1, 3, 1, 5)),
                     lambda x, r: (x + r,)),
}


def data(case: Case, shapes: dict, seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name in case.ints:
            out[name] = rng.integers(0, case.ints[name], size=shape).astype(np.int32)
        elif name in case.masks:
            out[name] = rng.choice([0.0, 2.0], size=shape).astype(dtype)
        else:
            out[name] = rng.standard_normal(shape).astype(dtype)
    return out


def assert_close(got, want, what: str) -> None:
    helpers.assert_close(got, want, what, RTOL, ATOL)


pytestmark = pytest.mark.usefixtures("own_op_cache")


# --------------------------------------------------------------------------- c against numpy


@needs_cc
@pytest.mark.parametrize("name", CASES)
def test_c_forward_and_backward_equal_the_numpy_reference(name):
    case = CASES[name]
    layer = case.layer()
    op_c, op_np = vggen.compile(layer, "c", case.sizes), vggen.compile(layer, "numpy", case.sizes)
    inputs = data(case, case.shapes, seed=1)
    fwd_c, fwd_np = op_c.forward(**inputs), op_np.forward(**inputs)
    assert set(fwd_c) == set(fwd_np) == set(op_c.outputs + op_c.saved)
    for n in fwd_c:
        assert fwd_c[n].dtype == (np.int32 if fwd_c[n].dtype.kind == "i" else np.float32)
        assert_close(fwd_c[n], fwd_np[n], f"{name} forward {n}")
    rng = np.random.default_rng(2)
    seeds = {f"g_{n}": rng.standard_normal(fwd_c[n].shape).astype(np.float32) for n in op_c.outputs}
    given_c = {n: ({**inputs, **fwd_c, **seeds})[n] for n in op_c.backward_inputs}
    given_np = {n: ({**inputs, **fwd_np, **seeds})[n] for n in op_np.backward_inputs}
    bwd_c, bwd_np = op_c.backward(**given_c), op_np.backward(**given_np)
    assert set(bwd_c) == set(bwd_np) == {f"g_{t.name}" for t in layer.differentiable_inputs}
    for n in bwd_c:
        assert_close(bwd_c[n], bwd_np[n], f"{name} backward {n}")


# --------------------------------------------------------------------------- torch


def torch_inputs(case: Case, arrays: dict, grad: bool) -> list:
    out = []
    for n, a in arrays.items():
        t = torch.from_numpy(a)
        out.append(t.requires_grad_() if grad and n not in case.ints and n not in case.masks else t)
    return out


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_on_the_numpy_target_in_float64(name):
    case = CASES[name]
    fn = vggen.torch.function(case.layer(), "numpy", case.sizes)
    assert fn.inputs == tuple(case.small)
    tensors = torch_inputs(case, data(case, case.small, seed=3, dtype=np.float64), grad=True)
    assert torch.autograd.gradcheck(fn.apply, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("name", CASES)
def test_c_in_float32_matches_torch_autograd(name):
    case = CASES[name]
    fn = vggen.torch.function(case.layer(), "c", case.sizes)
    arrays = data(case, case.shapes, seed=4)
    ours, theirs = torch_inputs(case, arrays, grad=True), torch_inputs(case, arrays, grad=True)
    y = fn.apply(*ours)
    y = y if isinstance(y, tuple) else (y,)
    ref = case.torch(*theirs)
    assert len(y) == len(ref) == len(fn.outputs)
    gen = torch.Generator().manual_seed(5)
    seeds = [torch.randn(r.shape, generator=gen) for r in ref]
    for n, a, r in zip(fn.outputs, y, ref):
        assert a.dtype == torch.float32
        assert_close(a.detach(), r.detach(), f"{name} {n}")
    wrt = [k for k, t in enumerate(ours) if t.requires_grad]
    got = torch.autograd.grad(y, [ours[k] for k in wrt], seeds)
    want = torch.autograd.grad(ref, [theirs[k] for k in wrt], seeds)
    for k, g, r in zip(wrt, got, want):
        assert_close(g, r, f"{name} ∂/∂{fn.inputs[k]}")


@needs_cc
def test_torch_tensors_go_in_without_a_copy_and_any_layout_works():
    op = vggen.compile(residual_add(), "c")
    x = torch.randn(2, 3, 5, 7)
    _, arrays = op.bind("forward", {"x": x.numpy(), "r": x.numpy()})
    assert np.shares_memory(arrays["x"], x.numpy())           # a contiguous float32 tensor is viewed
    module = vggen.torch.op(residual_add(), "c")
    r = torch.randn(2, 3, 7, 5).transpose(2, 3)               # not contiguous
    assert torch.equal(module(x, r=r), x + r)
    assert torch.equal(module(r=r, x=x), module(x, r))
    assert "ResidualAdd on c: (x, r) -> y" in repr(module)


class Launches:
    """A backend profiler that records the kernels launched."""

    def __init__(self):
        self.names = []

    def begin(self, name):
        self.names.append(name)

    def end(self, name):
        pass


@needs_cc
def test_only_the_gradients_autograd_asks_for_are_computed():
    fn = vggen.torch.function(convolution2d(), "c", sizes={"K": 1})
    x, w = torch.randn(2, 3, 5, 7), torch.randn(4, 3, 3, 3, requires_grad=True)
    fn.op.backend.profiler = launched = Launches()
    try:
        (g,) = torch.autograd.grad(fn.apply(x, w).sum(), [w])
    finally:
        fn.op.backend.profiler = None
    assert g.shape == w.shape
    # each by whichever algorithm runs it (direct or Winograd: the runtime's choice)
    assert [re.sub(r"_winograd\d$", "", n) for n in launched.names] == \
        ["convolution2d_forward_y", "convolution2d_backward_g_w"]


@needs_cc
def test_a_small_model_through_a_vggen_op_trains():
    """x → vggen Linear → ReLU → vggen Linear → cross-entropy, plain SGD."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=gen)
    t = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    dense = vggen.torch.op(linear(), "c")
    w1 = torch.nn.Parameter(torch.randn(8, 12, generator=gen) * 0.3)
    w2 = torch.nn.Parameter(torch.randn(12, 4, generator=gen) * 0.3)
    sgd = torch.optim.SGD([w1, w2], lr=0.5)
    losses = []
    for _ in range(15):
        sgd.zero_grad()
        loss = F.cross_entropy(dense(torch.relu(dense(x, w1)), w2), t)
        loss.backward()
        sgd.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_the_torch_module_wants_the_target_dtype():
    fn = vggen.torch.function(residual_add(), "c") if shutil.which("cc") else None
    if fn is not None:
        x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
        with pytest.raises(VggenError, match=r"^layer ResidualAdd: x is torch.float64; the c target's kernels "
                                             r"are float32: pass torch.float32 tensors$"):
            fn.apply(x, x)
    ref = vggen.torch.function(residual_add(), "numpy")
    x32 = torch.randn(1, 2, 3, 3)
    assert ref.apply(x32, x32).dtype == torch.float32             # numpy target: the inputs' dtype back
    with pytest.raises(VggenError, match="apply takes 2 tensors"):
        ref.apply(x32)


def test_without_cupy_the_cuda_target_is_one_line_and_vggen_torch_still_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)               # import cupy → ImportError
    with pytest.raises(VggenError) as err:
        vggen.compile(residual_add(), "cuda")
    assert "CuPy" in str(err.value) and "\n" not in str(err.value)
    runner = vggen.torch._Runner(vggen.compile(residual_add(), "numpy"))
    with pytest.raises(VggenError, match="CUDA tensors need CuPy"):
        runner._run_cuda("forward", {}, torch.device("cpu"), ())


# --------------------------------------------------------------------------- the cache


@needs_cc
def test_a_second_compile_runs_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("VGGEN_CACHE_DIR", str(tmp_path))
    layer = depthwise_convolution3x3()
    start = time.perf_counter()
    first = vggen.compile(layer, "c")
    cold = time.perf_counter() - start
    assert vggen.compile(depthwise_convolution3x3(), "c") is first       # the same equations: the same op
    ops._OPS.clear()                                           # as a new process would start

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit ran a compiler")

    from vggen.compiler import emit
    from vggen.runtime import c as c_runtime

    monkeypatch.setattr(emit, "outputs", refuse)
    monkeypatch.setattr(c_runtime, "compile_library", refuse)
    start = time.perf_counter()
    second = vggen.compile(depthwise_convolution3x3(), "c")
    warm = time.perf_counter() - start
    assert second is not first and second.directory == first.directory
    inputs = data(CASES["depthwise"], CASES["depthwise"].shapes, seed=6)
    np.testing.assert_array_equal(second.forward(**inputs)["y"], first.forward(**inputs)["y"])
    # the directory is named by the SHA-256 of what it holds, and nothing else is left beside it
    root = tmp_path / "ops"
    files = {str(f.relative_to(first.directory)): f.read_text() for f in first.directory.rglob("*") if f.is_file()}
    assert first.directory == root / ops.files_hash(files)
    assert sorted(p.name for p in root.iterdir()) == sorted([first.directory.name, ops.BY_LAYER])
    print(f"first compile {cold:.2f} s, cache hit {warm:.2f} s")
    assert warm < cold


def test_concurrent_publication_of_one_op_is_safe(tmp_path):
    files = {"manifest.json": '{"files": {"c/k.c": "x"}}\n', "c/k.c": "int k;\n"}
    got, errors = [], []
    barrier = threading.Barrier(6)

    def publish():
        try:
            barrier.wait()
            got.append(ops.publish(tmp_path, files))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1
    (directory,) = set(got)
    assert (directory / "c/k.c").read_text() == "int k;\n"
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]     # no temporaries left


def test_a_damaged_op_directory_is_replaced_and_dead_temporaries_removed(tmp_path):
    files = {"manifest.json": '{"files": {"c/k.c": "x"}}\n', "c/k.c": "int k;\n"}
    directory = ops.publish(tmp_path, files)
    (directory / "c/k.c").write_text("int k = 1;\n")                   # edited by hand
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".{'0' * 64}.{dead}.abcd.tmp"
    (stale / "c").mkdir(parents=True)
    assert ops.publish(tmp_path, files) == directory
    assert (directory / "c/k.c").read_text() == "int k;\n"
    assert not stale.exists()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("arrays, message", [
    (dict(x=(2, 3, 4, 5), r=(2, 3, 4, 6)),
     "layer ResidualAdd: r dimension 3 (W) has 6 elements, but W = 5 from x dimension 3"),
    (dict(x=(2, 3, 4), r=(2, 3, 4, 6)),
     r"layer ResidualAdd: x has rank 4 (B, C, H, W), got an array of shape (2, 3, 4)"),
])
def test_shapes_that_disagree_are_one_line_naming_the_tensor_and_dimension(arrays, message):
    op = vggen.compile(residual_add(), "numpy")
    with pytest.raises(VggenError) as err:
        op.forward(**{n: np.zeros(s) for n, s in arrays.items()})
    assert str(err.value) == message


def test_sizes_are_read_from_the_shapes_compound_dimensions_included():
    conv = vggen.compile(convolution2d(), "numpy")                 # w is (OC, IC, 2K+1, 2K+1)
    assert conv.sizes_of("forward", {"x": (2, 3, 5, 7), "w": (4, 3, 5, 5)}) == \
        dict(B=2, IC=3, H=5, W=7, OC=4, K=2)
    assert conv.sizes_of("backward", {"g_y": (2, 4, 5, 7), "x": (2, 3, 5, 7), "w": (4, 3, 3, 3)})["K"] == 1
    with pytest.raises(VggenError, match=r"^layer Convolution2D: w dimension 2 \(2\*K \+ 1\) has 4 elements, "
                                         r"which 2\*K \+ 1 is for no positive integer K$"):
        conv.sizes_of("forward", {"x": (2, 3, 5, 7), "w": (4, 3, 4, 4)})
    fixed = vggen.compile(convolution2d(), "numpy", sizes={"K": 1})
    with pytest.raises(VggenError, match=r"w dimension 2 \(2\*K \+ 1\) has 5 elements, but 2\*K \+ 1 = 3 "
                                         r"with K = 1 from compile\(sizes=...\)$"):
        fixed.sizes_of("forward", {"x": (2, 3, 5, 7), "w": (4, 3, 5, 5)})


@pytest.mark.parametrize("target", ["numpy", pytest.param("c", marks=needs_cc)])
def test_sizes_the_shapes_do_not_tell_and_other_mistakes_are_one_line(target):
    pool = vggen.compile(average_pooling2x2(), target)
    x = np.zeros((1, 2, 5, 4), np.float32)
    messages = []
    for call in (lambda: pool.forward(x=x),
                 lambda: vggen.compile(repeat(), target).forward(x=x[:, :, 0, 0]),
                 lambda: pool.forward(x=x[:, :, :4], y=x),
                 lambda: pool.backward(g_y=np.zeros((1, 2, 3), np.float32)),
                 lambda: vggen.compile(average_pooling2x2(), target, sizes={"K": 3}),
                 lambda: pool.forward(x=x[:, :, :4].astype(np.int64))):
        with pytest.raises(VggenError) as err:
            call()
        messages.append(str(err.value))
    assert messages == [
        "layer AveragePooling2D: x dimension 2 (2*HO) has 5 elements, which 2*HO is for no positive integer HO",
        "layer Repeat: the shapes of x do not tell K: fix it with vggen.compile(..., sizes={'K': ...})",
        "layer AveragePooling2D: forward takes x; got unknown y",
        "layer AveragePooling2D: g_y has rank 4 (B, C, HO, WO), got an array of shape (1, 2, 3)",
        "layer AveragePooling2D: no size or constant named K (it has B, C, HO, WO)",
        "layer AveragePooling2D: x is int64; it is a float tensor",
    ]
    y = vggen.compile(repeat(), target, sizes={"K": 3}).forward(x=x[:, :, 0, 0])["y"]
    assert y.shape == (1, 2, 3)


@needs_cc
def test_the_c_target_names_a_wrong_dtype():
    op = vggen.compile(residual_add(), "c")
    x = np.zeros((1, 2, 3, 3))
    with pytest.raises(VggenError, match=r"^layer ResidualAdd: x is float64; the c target's kernels are "
                                         r"float32: pass float32 arrays, or use target 'numpy'$"):
        op.forward(x=x, r=x)


@pytest.mark.parametrize("target", ["numpy", pytest.param("c", marks=needs_cc)])
def test_an_update_in_place_reaches_the_callers_arrays(target):
    from vggen.frontend.updates import sgd_momentum

    op = vggen.compile(sgd_momentum(), target)
    p, v = np.ones(5, np.float32), np.zeros(5, np.float32)
    assert op.forward(p=p, v=v, g=np.full(5, 2, np.float32), h=np.array([0.1, 0.9, 0.0], np.float32)) == {}
    np.testing.assert_allclose(v, 2.0)
    np.testing.assert_allclose(p, 0.8, rtol=1e-6)
    with pytest.raises(VggenError, match="SGD updates state in place"):
        vggen.torch.function(sgd_momentum(), target)


# --------------------------------------------------------------------------- import


def test_import_vggen_stays_light_and_compile_is_exported():
    code = ("import sys, vggen; heavy = [m for m in ('sympy', 'numpy', 'torch', 'vggen.ops') if m in sys.modules];"
            "assert not heavy, heavy; from vggen import compile; import vggen.ops;"
            "assert compile is vggen.ops.compile and vggen.torch.function")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_vggen_torch_is_the_package_module_and_torch_is_still_torch():
    assert vggen.torch.__name__ == "vggen.torch"
    assert Path(torch.__file__).parent.name == "torch" and hasattr(torch, "autograd")


def test_an_unseen_strided_pooling_matches_torch_given_x_for_its_shape():
    """3×3 average pooling, stride 2, padding 1 (counting the padding, as
    PyTorch's default): its backward reads only g_y, and x is given for H, W."""
    torch = pytest.importorskip("torch")
    B, C, H, W, HO, WO = sizes("B C H W HO WO")
    b, c, i, j, p, q = indices("b c i j p q")
    x = Tensor("x", (B, C, H, W), Role.INPUT, zero_outside=True)
    y = Tensor("y", (B, C, HO, WO), Role.OUTPUT)
    pool = Layer("AvgPool3x3s2", [x, y], [Equation(
        y[b, c, i, j], Sum(x[b, c, 2 * i + p - 1, 2 * j + q - 1], (p, 0, 3), (q, 0, 3)) / 9)])
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    gy = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    op = vggen.compile(pool, "c", sizes={"HO": 5, "WO": 4})      # the output's size is free
    with pytest.raises(VggenError, match="do not tell H, W"):
        op.backward(g_y=gy)
    out, gx = op.forward(x=xs)["y"], op.backward(g_y=gy, x=xs)["g_x"]
    t = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.avg_pool2d(t, 3, 2, 1)
    ref.backward(torch.tensor(gy, dtype=torch.float64))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, t.grad.numpy(), rtol=1e-5, atol=1e-6)
