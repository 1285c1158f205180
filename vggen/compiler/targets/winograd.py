"""What every target's Winograd variants share (``vggen.compiler.passes.winograd``
finds the kernels; ``targets.c.winograd`` and ``targets.cuda.winograd`` emit them).

A matched contraction gets, beside its direct kernel, one variant per tile
size m (``ALGORITHMS``): ``<kernel>_winograd<m>``, with the direct kernel's
signature, so that the runtime may call either (``vggen.runtime.algorithms``).
Every transform is printed from the exact SymPy matrices of
``vggen.derive.winograd`` as the statements of Z = L X Rᵀ (the product L X
first, then ·Rᵀ, each intermediate a local); each target says where X is
read and Z written.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import sympy as sp

from vggen.compiler.ir import Kernel
from vggen.compiler.passes.winograd import WinogradMatch, match
from vggen.compiler.targets.base import comment
from vggen.derive.winograd import (
    WinogradTransforms,
    forward_transforms,
    weight_gradient_transforms,
)

# The tile sizes m generated for every matched kernel: F(2×2, 3×3) and F(4×4, 3×3)
# (for ∂L/∂w, F(3×3, 2×2) and F(3×3, 4×4)).
ALGORITHMS = (2, 4)


def algorithm_name(m: int) -> str:
    return f"winograd{m}"


def variant_name(kernel: str, m: int) -> str:
    return f"{kernel}_{algorithm_name(m)}"


def transforms_for(found: WinogradMatch, m: int) -> WinogradTransforms:
    """F(m×m, 3×3) for the data form, F(3×3, m×m) for the filter form."""
    return forward_transforms(m) if found.form == "data" else weight_gradient_transforms(m)


@dataclass(frozen=True)
class Transform:
    """One printed transform Z = L X Rᵀ: its function's name, what it computes,
    and its statements."""

    name: str
    what: str
    statements: tuple


def separable(name: str, what: str, L: sp.Matrix, R: sp.Matrix, printer, source: str, result: str) -> Transform:
    """The statements of Z = L X Rᵀ, X an L.cols × R.cols grid: element e of X
    read as ``source.format(e=e)``, of Z written to ``result.format(e=e)``
    (row-major), printed by ``printer`` (a CPrinter or its subclass)."""
    rows, cols = L.cols, R.cols
    X = sp.Matrix(rows, cols, lambda a, b: sp.Symbol(f"vg_x{a}_{b}"))
    Y = sp.Matrix(L.rows, cols, lambda i, b: sp.Symbol(f"vg_y{i}_{b}"))
    printer.aliases.update({X[a, b]: source.format(e=a * cols + b) for a in range(rows) for b in range(cols)})
    printer.aliases.update({Y[i, b]: Y[i, b].name for i in range(L.rows) for b in range(cols)})
    out = []
    LX = L * X
    for i in range(L.rows):
        for b in range(cols):
            out.append(f"const float {Y[i, b].name} = {printer.code(sp.expand(LX[i, b]))};")
    Z = Y * R.T
    for i in range(Z.rows):
        for j in range(Z.cols):
            out.append(f"{result.format(e=i * Z.cols + j)} = {printer.code(sp.expand(Z[i, j]))};")
    return Transform(name, what, tuple(out))


def transforms(t: WinogradTransforms, printer_class, source: str, result: str) -> dict:
    """The three transforms of ``t`` ("data", "filter", "output"), named by the
    algorithm (``vg_winograd_f4x4_3x3_data``): the same functions for every kernel
    that runs it, defined once per file (:func:`definitions`)."""
    n = t.n

    def one(which, what, L):
        name = f"vg_winograd_f{t.m}x{t.m}_{t.r}x{t.r}_{which}"
        return separable(name, what, L, L, printer_class({}), source, result)

    return {
        "data": one("data", f"V = Bᵀ d B for {n}×{n} data tiles", t.BT),
        "filter": one("filter", f"U = G g Gᵀ for {t.r}×{t.r} filters", t.G),
        "output": one("output", f"Y = Aᵀ M A, {t.m}×{t.m} outputs", t.AT),
    }


def definitions(transforms: dict, template: jinja2.Template) -> dict:
    """The transforms' functions (name → code, ``template`` rendered for each),
    for ``GeneratedKernel.definitions``."""
    return {t.name: template.render(t=t) for t in transforms.values()}


def shift(offset: int) -> str:
    """An offset as the templates add it to an index: "- 1", "+ 2"."""
    return f"{'-' if offset < 0 else '+'} {abs(offset)}"


def comment_lines(kernel: Kernel, t: WinogradTransforms) -> list[str]:
    """The variant's comment: the direct kernel's equations, then the algorithm."""
    lines = comment(kernel)
    lines.append(f"  as Winograd {t.name} (points {', '.join(map(str, t.points))}, ∞; "
                 f"vggen.derive.winograd), proved equal by `vggen check`")
    return lines


def variants(kernel: Kernel, env: jinja2.Environment, render) -> list:
    """The Winograd variants of ``kernel``, ``render(kernel, found, m, env)`` for
    each tile size m; none where it is not a 3×3 stride-1 correlation."""
    found = match(kernel)
    if found is None:
        return []
    return [render(kernel, found, m, env) for m in ALGORITHMS]


def algorithm_entry(kernel: Kernel, found: WinogradMatch, t: WinogradTransforms, m: int) -> dict:
    """The manifest's ``algorithm`` entry of a variant (``vggen.manifest.KernelSpec.algorithm``)."""
    return {"name": algorithm_name(m), "replaces": kernel.name, "form": found.form, "tile": m,
            "transforms": t.name, "points": [str(v) for v in t.points],
            "sizes": {role: str(e) for role, e in found.sizes.items()}}


__all__ = ["ALGORITHMS", "Transform", "algorithm_entry", "algorithm_name", "comment_lines", "definitions", "separable", "shift", "variants",
           "transforms", "transforms_for", "variant_name"]
