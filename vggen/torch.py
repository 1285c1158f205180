"""A vggen layer as a PyTorch autograd function (``pip install 'vggen[torch]'``).

    F = vggen.torch.function(layer, "c")       # a torch.autograd.Function subclass
    y = F.apply(x, w)                          # F.inputs == ("x", "w"): the layer's declared order

``apply`` takes the layer's inputs and parameters in the order the layer
declares its tensors (``F.inputs``) and returns its outputs (``F.outputs``):
one tensor, or a tuple of several.  The backward is the derived one
(:func:`vggen.compile`); it returns a gradient for every differentiable
input and parameter and None for the others (labels, masks), and computes
only the gradients autograd asks for.  It is not itself differentiable
(no double backward).

Targets and tensors:

* ``c``: CPU float32 tensors, handed to the kernels without a copy
  (``tensor.detach().numpy()``; a non-contiguous one is made contiguous
  first); outputs and gradients are allocated by torch and written in place.
* ``numpy``: CPU tensors of float32 or float64, evaluated in float64 (the
  reference; ``torch.autograd.gradcheck`` runs against it); results come
  back in the inputs' float dtype.
* ``cuda``: CUDA float32 tensors through DLPack (``cupy.from_dlpack``,
  zero-copy), the kernels launched on PyTorch's current stream.  Needs CuPy;
  this module imports without it.

Integer tensors (labels) take any integer dtype and are copied to int32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

try:
    import torch
except ImportError as e:       # the optional extra
    raise ImportError("vggen.torch needs PyTorch: pip install 'vggen[torch]'") from e

from vggen.errors import VggenError
from vggen.frontend.lang import Layer, Role
from vggen.ops import Op as CompiledOp
from vggen.ops import compile as compile_op

_NUMPY_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
             np.dtype(np.int32): torch.int32}


def function(layer: Layer, target: str = "c", sizes: Mapping | None = None) -> type[torch.autograd.Function]:
    """``layer`` compiled for ``target`` as a ``torch.autograd.Function`` subclass
    (see the module docstring); ``sizes`` as for :func:`vggen.compile`."""
    if any(t.role is Role.STATE for t in layer.tensors):
        raise VggenError(f"layer {layer.name} updates state in place: run it with vggen.compile, "
                         f"not as an autograd function")
    op = compile_op(layer, target, sizes)
    runner = _Runner(op)
    names = op.inputs

    class VggenFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            if len(tensors) != len(names):
                raise VggenError(f"layer {op.name}: apply takes {len(names)} tensors "
                                 f"({', '.join(names)}), got {len(tensors)}")
            given = dict(zip(names, tensors))
            computed = runner.run("forward", given)
            outputs = [computed[n] for n in op.outputs]
            keep = [n for n in op.backward_inputs if n not in op.seeds]
            ctx.vggen_saved = tuple(keep)
            # the shapes of the inputs the backward does not read: they may tell
            # sizes its own tensors cannot (a global pooling's H and W)
            ctx.vggen_shapes = {n: tuple(given[n].shape) for n in names if n not in keep}
            ctx.save_for_backward(*[given[n] if n in given else computed[n] for n in keep])
            ctx.mark_non_differentiable(*[t for t in outputs if not t.is_floating_point()])
            return outputs[0] if len(outputs) == 1 else tuple(outputs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            wanted = {f"g_{n}" for n, need in zip(names, ctx.needs_input_grad) if need} & set(op.gradients)
            if not wanted:
                return (None,) * len(names)
            given = dict(zip(ctx.vggen_saved, ctx.saved_tensors))
            given.update({s: g for s, g in zip(op.seeds, grads) if s in op.backward_inputs})
            computed = runner.run("backward", given, skip=set(op.gradients) - wanted,
                                  shapes=ctx.vggen_shapes)
            return tuple(computed.get(f"g_{n}") if f"g_{n}" in wanted else None for n in names)

    VggenFunction.__name__ = VggenFunction.__qualname__ = f"{_identifier(layer.name)}Function"
    VggenFunction.__doc__ = (f"vggen layer {layer.name} on {target}: apply({', '.join(names)}) -> "
                             f"{', '.join(op.outputs)}")
    VggenFunction.op = op
    VggenFunction.inputs = names
    VggenFunction.outputs = op.outputs
    return VggenFunction


class Module(torch.nn.Module):
    """``function(layer, target)`` as a module: call it with the layer's inputs
    and parameters, by position in the declared order or by name."""

    def __init__(self, layer: Layer, target: str = "c", sizes: Mapping | None = None):
        super().__init__()
        self.function = function(layer, target, sizes)
        self.inputs = self.function.inputs

    def forward(self, *tensors, **named):
        if named:
            clash = [n for n in self.inputs[:len(tensors)] if n in named]
            unknown = [n for n in named if n not in self.inputs]
            if clash or unknown:
                raise VggenError(f"layer {self.function.op.name}: takes {', '.join(self.inputs)}; "
                                 f"{'given twice: ' + ', '.join(clash) if clash else 'unknown: ' + ', '.join(unknown)}")
            missing = [n for n in self.inputs[len(tensors):] if n not in named]
            if missing:
                raise VggenError(f"layer {self.function.op.name}: missing {', '.join(missing)}")
            tensors = tensors + tuple(named[n] for n in self.inputs[len(tensors):])
        return self.function.apply(*tensors)

    def extra_repr(self) -> str:
        op = self.function.op
        return f"{op.name} on {op.target}: ({', '.join(self.inputs)}) -> {', '.join(op.outputs)}"


def op(layer: Layer, target: str = "c", sizes: Mapping | None = None) -> Module:
    """``layer`` as a ``torch.nn.Module`` (no parameters of its own: pass them in)."""
    return Module(layer, target, sizes)


def _identifier(name: str) -> str:
    out = "".join(ch if ch.isalnum() else "_" for ch in name)
    return out if out[:1].isalpha() else f"Layer_{out}"


# --------------------------------------------------------------------------- tensors to arrays


class _Runner:
    """Runs one direction of an op on torch tensors: checks device and dtype,
    views the tensors as the backend's arrays, lets torch allocate what the
    kernels write, and hands those back as tensors."""

    def __init__(self, vop: CompiledOp):
        self.op = vop

    def run(self, which: str, given: dict, skip=(), shapes: Mapping | None = None) -> dict:
        """``shapes``: tensors given by their shape alone (read for sizes, never for values)."""
        vop = self.op
        device = self._device(which, given)
        float_dtype = self._float_dtype(which, given)
        shape_only = {n: np.broadcast_to(np.float32(0), s) for n, s in (shapes or {}).items()}
        if vop.target == "cuda":
            return self._run_cuda(which, given, device, skip, shape_only)
        arrays = {n: self._host(n, t) for n, t in given.items()} | shape_only
        program, arrays = vop.bind(which, arrays)
        out = {n: torch.empty(program.shapes[n], dtype=_NUMPY_OF[program.dtypes[n]]) for n in program.outputs}
        arrays.update({n: t.numpy() for n, t in out.items()})
        program(arrays, skip)
        return {n: (t.to(float_dtype) if t.is_floating_point() and float_dtype is not None else t)
                for n, t in out.items()}

    def _device(self, which: str, given: dict) -> torch.device:
        vop = self.op
        devices = {t.device for t in given.values()}
        if len(devices) > 1:
            where = ", ".join(f"{n} on {t.device}" for n, t in given.items())
            raise VggenError(f"layer {vop.name}: tensors on several devices ({where})")
        (device,) = devices or {torch.device("cpu")}
        if vop.target == "cuda" and device.type != "cuda":
            raise VggenError(f"layer {vop.name}: the cuda target takes CUDA tensors, got {device} tensors")
        if vop.target != "cuda" and device.type != "cpu":
            raise VggenError(f"layer {vop.name}: the {vop.target} target runs on the CPU, got {device} "
                             f"tensors: use target='cuda', or .cpu()")
        return device

    def _float_dtype(self, which: str, given: dict):
        """The float dtype results come back in: the target's, or on numpy the inputs'."""
        vop = self.op
        layer = vop.layer if which == "forward" else vop.backward_layer
        floats = {n: t.dtype for n, t in given.items() if layer.tensor(n).dtype == "float"}
        allowed = (torch.float32, torch.float64) if vop.target == "numpy" else (torch.float32,)
        for n, dtype in floats.items():
            if dtype not in allowed:
                kernels = "evaluates float32 or float64" if vop.target == "numpy" else "kernels are float32"
                raise VggenError(f"layer {vop.name}: {n} is {dtype}; the {vop.target} target's {kernels}: "
                                 f"pass {' or '.join(str(a) for a in allowed)} tensors")
        if vop.target != "numpy":
            return None
        return torch.float32 if floats and all(d == torch.float32 for d in floats.values()) else torch.float64

    def _host(self, name: str, t: torch.Tensor) -> np.ndarray:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype == torch.bool:
            raise VggenError(f"layer {self.op.name}: {name} is torch.bool; pass a float or an int tensor")
        return t.numpy()

    def _run_cuda(self, which: str, given: dict, device: torch.device, skip,
                  shape_only: dict | None = None) -> dict:
        # Never run on a GPU in this repository's tests (none where they ran): written to the
        # DLPack and stream contracts of CuPy and PyTorch, import-safe without CuPy.
        try:
            import cupy
        except ImportError:
            raise VggenError("CUDA tensors need CuPy: pip install 'vggen[cuda]'") from None
        vop = self.op
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
        with cupy.cuda.Device(index), stream:
            # inside the stream: DLPack's exchange then orders nothing extra (same stream)
            arrays = {n: cupy.from_dlpack(_contiguous(t.detach())) for n, t in given.items()} | (shape_only or {})
            program, arrays = vop.bind(which, arrays)
            out = {n: torch.empty(program.shapes[n], dtype=_NUMPY_OF[program.dtypes[n]], device=device)
                   for n in program.outputs}
            arrays.update({n: cupy.from_dlpack(t) for n, t in out.items()})
            program(arrays, skip)
        return out


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


__all__ = ["function", "op", "Module"]
