"""``KernelProgram``: one binding, one set of checks and one skip rule for
every kernel target, here on a recording target that launches nothing."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO
from vggen.errors import VggenError
from vggen.frontend import layers
from vggen.manifest import ArgSpec, KernelSpec
from vggen.runtime.base import KernelBackend, KernelCall

SIZES = {"B": 1, "C": 2, "H": 3, "W": 1}


class Recording(KernelBackend):
    """A kernel target whose launches are recorded, not run."""

    name = manifest_target = "c"

    def __init__(self, generated):
        super().__init__(generated)
        self.launched: list = []

    def function(self, spec: KernelSpec):
        return spec.name

    def size_argument(self, arg: ArgSpec, value: int):
        return ("size", arg.name, value)

    def geometry(self, spec, sizes):
        return ("geometry", sizes["B"])

    def launch(self, call: KernelCall, arrays: list) -> None:
        self.launched.append((call.fn, [a.shape for a in arrays], call.sizes, call.geometry))


def _signature(x_dtype="float32", shape=("B", "C", "H", "W")):
    return [{"name": "x", "kind": "tensor", "dtype": x_dtype, "access": "read", "shape": list(shape)},
            {"name": "y", "kind": "tensor", "dtype": "float32", "access": "write", "shape": list(shape)},
            *[{"name": s, "kind": "size", "dtype": "int", "access": "size"} for s in "BCHW"]]


def _generated(root: Path, entries: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"kernels": entries}))
    return root


def _relu_forward(**kw) -> dict:
    return {"name": "relu_forward_y", "target": "c", "layer": "ReLU", "direction": "forward",
            "class": "elementwise", "file": "c/k.c", "signature": _signature(**kw)}


def test_a_call_binds_from_the_signature_and_launches_through_the_target(tmp_path):
    be = Recording(_generated(tmp_path, [_relu_forward()]))
    x = np.zeros((1, 2, 3, 1), np.float32)
    be.run(layers.relu(), SIZES, {"x": x})
    assert be.launched == [("relu_forward_y", [(1, 2, 3, 1)] * 2,
                            tuple(("size", s, SIZES[s]) for s in "BCHW"), ("geometry", 1))]


def test_every_target_checks_the_manifest_dtype(tmp_path):
    be = Recording(_generated(tmp_path, [_relu_forward(x_dtype="int32")]))
    with pytest.raises(VggenError, match="argument x is int32 in the manifest but float32 in layer ReLU"):
        be.program(layers.relu(), SIZES)


def test_every_target_checks_the_manifest_shape(tmp_path):
    be = Recording(_generated(tmp_path, [_relu_forward(shape=("B", "C", "H", "3"))]))
    with pytest.raises(VggenError, match="argument x has shape .* in the manifest"):
        be.program(layers.relu(), SIZES)


def test_arrays_are_checked_before_each_launch(tmp_path):
    be = Recording(_generated(tmp_path, [_relu_forward()]))
    with pytest.raises(VggenError, match="kernel relu_forward_y: argument x has the wrong shape"):
        be.run(layers.relu(), SIZES, {"x": np.zeros((1, 2, 3, 2), np.float32)})
    with pytest.raises(VggenError, match="argument x is not C-contiguous"):
        be.run(layers.relu(), SIZES, {"x": np.zeros((1, 3, 2, 1), np.float32).transpose(0, 2, 1, 3)})
    assert be.launched == []


def test_the_profiler_brackets_each_launch(tmp_path):
    be = Recording(_generated(tmp_path, [_relu_forward()]))
    events = []

    class Profiler:
        def begin(self, name):
            events.append(("begin", name, len(be.launched)))

        def end(self, name):
            events.append(("end", name, len(be.launched)))

    be.profiler = Profiler()
    be.run(layers.relu(), SIZES, {"x": np.zeros((1, 2, 3, 1), np.float32)})
    assert events == [("begin", "relu_forward_y", 0), ("end", "relu_forward_y", 1)]


def _tensor(name: str, access: str, shape: tuple) -> dict:
    return {"name": name, "kind": "tensor", "dtype": "float32", "access": access, "shape": list(shape)}


def test_a_skipped_tensor_is_computed_only_when_another_kernel_reads_it(tmp_path):
    """BatchNormalization's forward as three kernels: μ (read by the next two),
    σ² (read by the last), then x̂ and y."""
    full, channel = ("B", "C", "H", "W"), ("C",)
    sizes = [{"name": s, "kind": "size", "dtype": "int", "access": "size"} for s in "BCHW"]
    kernels = (("bn_mu", [("x", "read", full), ("mu", "write", channel)]),
               ("bn_var", [("mu", "read", channel), ("x", "read", full), ("var", "write", channel)]),
               ("bn_y", [("beta", "read", channel), ("gamma", "read", channel), ("mu", "read", channel),
                         ("var", "read", channel), ("x", "read", full), ("xhat", "write", full),
                         ("y", "write", full)]))
    entries = [{"name": name, "target": "c", "layer": "BatchNormalization", "direction": "forward",
                "class": "reduction", "file": "c/k.c", "signature": [_tensor(*a) for a in args] + sizes}
               for name, args in kernels]
    be = Recording(_generated(tmp_path, entries))
    bn = layers.batch_normalization()
    prog = be.program(bn, SIZES)
    arrays = {n: np.zeros(prog.shapes[n], np.float32) for n in prog.inputs}

    def launched(skip):
        be.launched.clear()
        be.run(bn, SIZES, arrays, skip=skip)
        return [fn for fn, *_ in be.launched]

    assert launched(()) == ["bn_mu", "bn_var", "bn_y"]
    assert launched(("xhat", "y")) == ["bn_mu", "bn_var"]
    assert launched(("mu", "var")) == ["bn_mu", "bn_var", "bn_y"]     # read by bn_y


def test_launches_bind_each_kernel_on_its_own(tmp_path):
    be = Recording(_generated(tmp_path, [_relu_forward()]))
    x, y = np.zeros((1, 2, 3, 1), np.float32), np.zeros((1, 2, 3, 1), np.float32)
    [launch] = be.program(layers.relu(), SIZES).launches({"x": x, "y": y})
    assert launch.name == "relu_forward_y" and be.launched == []
    launch()
    assert [fn for fn, *_ in be.launched] == ["relu_forward_y"]


def test_a_manifest_without_the_targets_kernels(tmp_path):
    entry = {**_relu_forward(), "target": "cuda"}
    with pytest.raises(VggenError, match="lists no c kernels: regenerate them"):
        Recording(_generated(tmp_path, [entry]))


# --------------------------------------------------------------------------- the CUDA target, on a fake CuPy


def _fake_cupy(launched: list):
    """Just enough of CuPy for CudaBackend: NumPy arrays, one visible GPU, and
    modules whose kernels record their launches."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray, cupy.array, cupy.zeros, cupy.empty = np.ndarray, np.array, np.zeros, np.empty
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                      compiler=types.SimpleNamespace(CompileException=RuntimeError))

    class RawModule:
        def __init__(self, code, options):
            self.code = code

        def get_function(self, name):
            assert f"{name}(" in self.code
            return lambda grid, block, args: launched.append((name, grid, block, args))

    cupy.RawModule = RawModule
    return cupy


def test_the_cuda_target_launches_with_the_manifests_geometry(monkeypatch):
    from vggen.runtime.cuda import CudaBackend, Launch

    launched: list = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(launched))
    be = CudaBackend(generated=REPO / "generated")
    sizes = {"B": 2, "C": 3, "H": 20, "W": 10}
    x = np.ones((2, 3, 20, 10), np.float32)
    out = be.run(layers.relu(), sizes, {"x": x})
    [(name, grid, block, args)] = launched
    assert (name, grid, block) == ("relu_forward_y", (5, 1, 1), (256, 1, 1))   # ⌈1200/256⌉ blocks
    assert args[0] is x and args[1] is out["y"]
    assert [type(a) for a in args[2:]] == [np.int32] * 4 and list(args[2:]) == [2, 3, 20, 10]
    with pytest.raises(VggenError, match="kernel relu_forward_y: argument x has the wrong dtype"):
        be.run(layers.relu(), sizes, {"x": x.astype(np.float64)})
    [launch] = be.program(layers.relu(), sizes).launches({"x": x, "y": out["y"]})
    assert isinstance(launch, Launch)
