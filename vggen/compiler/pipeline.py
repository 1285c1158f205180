"""The kernel pipeline: equations in, kernel IR out, through the passes in order.

1. ``passes.specialise``  window sizes and constants become numbers;
2. ``passes.analyse``     what cannot be emitted safely is rejected (inside 3);
3. ``passes.lower``       one equation → one ``Stage``;
4. ``passes.fuse``        consecutive stages sharing a loop nest → one kernel;
5. ``passes.classify``    the kernel's class (its template);
6. ``passes.order``       a contraction's contiguous loop innermost.

The targets (``vggen.compiler.targets``) schedule and print the result.
``lower_layer(..., trace=[])`` keeps the intermediates for inspection.
"""

from __future__ import annotations

from vggen.compiler.ir import Kernel, Stage, layer_slug
from vggen.compiler.passes.classify import classify
from vggen.compiler.passes.fuse import output_loops, try_fuse
from vggen.compiler.passes.lower import lower_stage
from vggen.compiler.passes.order import order_loops
from vggen.compiler.passes.specialise import specialisation, specialise_tensor
from vggen.errors import VggenError
from vggen.frontend.lang import Equation, Layer


def _kernel(stages: list[Stage], layer: Layer, subs: dict, tensors: dict, name: str | None) -> Kernel:
    base, direction = layer.forward_name, layer.direction
    cls = classify(stages)
    parallel = output_loops(stages[0])
    if name is None:
        name = "_".join([layer_slug(base), direction] + [s.tensor.name.lower() for s in stages])
    innermost = order_loops(cls, parallel, stages)
    return Kernel(name, base, direction, cls, parallel, stages, tensors, dict(subs), innermost)


def _specialised(layer: Layer, specialise: dict | None) -> tuple[dict, dict]:
    subs = specialisation(layer, specialise)
    return subs, {t.name: specialise_tensor(t, subs) for t in layer.tensors}


def lower(equation: Equation, layer: Layer, specialise: dict | None = None, *, name: str | None = None) -> Kernel:
    """One equation of ``layer`` as a single-stage kernel (analysed, lowered, ordered)."""
    subs, tensors = _specialised(layer, specialise)
    return _kernel([lower_stage(equation, layer, subs, tensors)], layer, subs, tensors, name)


def lower_layer(layer: Layer, specialise: dict | None = None, *, fuse: bool = True,
                trace: list | None = None) -> list[Kernel]:
    """Every equation of ``layer`` (a forward layer or a ``Backward.program``),
    consecutive ones fused where they share the loop nest.  ``trace``, where
    given, receives ("stages", the lowered stages) and ("groups", the fused
    groups) before the kernels are built."""
    subs, tensors = _specialised(layer, specialise)
    stages = [lower_stage(eq, layer, subs, tensors) for eq in layer.equations]
    groups: list[list[Stage]] = []
    for stage in stages:
        joined = try_fuse(groups[-1], stage) if (fuse and groups) else None
        if joined is not None:
            groups[-1].append(joined)
        else:
            groups.append([stage])
    if trace is not None:
        trace += [("stages", list(stages)), ("groups", [list(g) for g in groups])]
    kernels = [_kernel(g, layer, subs, tensors, None) for g in groups]
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise VggenError(f"layer {layer.name}: two kernels would be named alike: {names}")
    return kernels


def lower_network(layers: list[Layer], specialise: dict | None = None) -> list[Kernel]:
    """Forward then backward kernels of each layer, in order."""
    from vggen.derive.autodiff import derive

    out = []
    for layer in layers:
        out += lower_layer(layer, specialise)
        if layer.differentiable_inputs:          # an optimizer's update has no backward
            out += lower_layer(derive(layer).program, specialise)
    names = [k.name for k in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VggenError(f"two layers give kernels of the same name: {', '.join(dup)}")
    return out
