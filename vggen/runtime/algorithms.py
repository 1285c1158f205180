"""Which algorithm runs a kernel that has several: direct, Winograd F(2×2, 3×3)
(``winograd2``) or F(4×4, 3×3) (``winograd4``); the manifest lists the
Winograd kernels beside the direct one they stand in for, same signature
(``vggen.compiler.targets.c.winograd``, ``vggen.compiler.targets.cuda.winograd``).

For a kernel at given sizes the choice is, in order:

1. the caller's (``--conv-algorithm``), where the kernel has that algorithm;
2. the measurement of ``vggen tune`` at those sizes, recorded in the manifest
   (the direct kernel's ``measured`` entries), where it was measured on this
   device (the record names it: :func:`cpu_name`, or the GPU's name);
3. on the C target, the cost model (:func:`predicted_ms`); on CUDA, where no
   model was fit, direct.

The cost model: milliseconds = α·(multiply–adds ×2 of the channel sums) +
β·(elements the transforms or the direct loops move) + γ, per algorithm and
form (``data``: forward and ∂L/∂x; ``filter``: ∂L/∂w).  The constants were fit
(nonnegative least squares on relative error) to 54 kernel timings on a
2-core Xeon with AVX-512 (the network's convolutions at widths 64 and 16,
batch 64): the model's pick is the measured fastest in 42 of 54 and costs
4.7% more than the measured best on average.  A machine unlike that one
should record its own (``vggen tune --target c``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from vggen.errors import VggenError
from vggen.manifest import KernelSpec, eval_size

DIRECT = "direct"
ALGORITHMS = (DIRECT, "winograd2", "winograd4")
POLICIES = ("auto",) + ALGORITHMS

# (α ms per flop, β ms per element moved, γ ms) per (form, algorithm); see the docstring.
COSTS = {
    ("data", "direct"): (6.20e-09, 2.46e-07, 0.459),
    ("data", "winograd2"): (6.66e-09, 2.03e-07, 0.260),
    ("data", "winograd4"): (8.76e-09, 1.93e-07, 0.291),
    ("filter", "direct"): (7.62e-09, 1.85e-07, 0.378),
    ("filter", "winograd2"): (7.22e-09, 7.07e-07, 0.0),
    ("filter", "winograd4"): (9.36e-09, 5.45e-07, 0.0255),
}
_PANEL_ROWS, _PANEL_COLUMNS = 8, 32     # VG_MR, VG_NR: the channel dims the products round up to


def cpu_name() -> str:
    """This machine's CPU model and core count, as records and benchmarks name it."""
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def roles(spec: KernelSpec, sizes: Mapping[str, int]) -> dict:
    """B, C (the data's channels), O, H, W of a Winograd kernel at ``sizes``."""
    return {r: eval_size(e, sizes) for r, e in spec.entry["algorithm"]["sizes"].items()}


def predicted_ms(form: str, algorithm: str, B: int, C: int, O: int, H: int, W: int) -> float:
    """The cost model's milliseconds (see the module docstring)."""
    alpha, beta, gamma = COSTS[(form, algorithm)]
    if algorithm == DIRECT:
        return alpha * 18 * B * H * W * C * O + beta * B * H * W * (C + O) + gamma
    m = int(algorithm.removeprefix("winograd"))
    n = m + 2
    tiles = B * _ceil(H, m) * _ceil(W, m)
    o = _ceil(O, _PANEL_ROWS) * _PANEL_ROWS
    c = _ceil(C, _PANEL_COLUMNS) * _PANEL_COLUMNS if form == "filter" else C
    return alpha * 2 * n * n * tiles * c * o + beta * n * n * tiles * (C + O) + gamma


def recorded(spec: KernelSpec, sizes: Mapping[str, int]) -> str | None:
    """The algorithm ``vggen tune --target c`` measured fastest for ``spec`` at ``sizes``."""
    for rec in spec.entry.get("measured", ()):
        if all(int(sizes.get(k, -1)) == v for k, v in rec["sizes"].items()):
            return rec["algorithm"]
    return None


def choose(spec: KernelSpec, alternatives: list[KernelSpec], sizes: Mapping[str, int],
           policy: str = "auto", measured_here: bool = True, model: bool = True) -> KernelSpec:
    """The kernel to run for ``spec`` at ``sizes``: ``spec`` itself or one of its
    ``alternatives`` (see the module docstring); ``measured_here``: whether the
    manifest's records were measured on this device (else the model decides);
    ``model``: whether there is a cost model (else unmeasured means direct)."""
    if policy not in POLICIES:
        raise VggenError(f"unknown convolution algorithm {policy!r}: choose one of {', '.join(POLICIES)}")
    if not alternatives or policy == DIRECT:
        return spec
    by_name = {alt.algorithm: alt for alt in alternatives}
    if policy != "auto":
        return by_name.get(policy, spec)
    name = recorded(spec, sizes) if measured_here else None
    if name is not None and name != DIRECT and name not in by_name:
        name = None         # recorded among algorithms not offered here: the model decides
    if name is None and not model:
        return spec
    if name is None:
        first = alternatives[0]
        form = first.entry["algorithm"]["form"]
        r = roles(first, sizes)
        costs = {DIRECT: predicted_ms(form, DIRECT, **r)}
        costs.update({a: predicted_ms(form, a, **r) for a in by_name})
        name = min(costs, key=costs.get)
    return by_name.get(name, spec)


__all__ = ["ALGORITHMS", "POLICIES", "DIRECT", "COSTS", "cpu_name", "predicted_ms", "recorded", "choose", "roles"]
