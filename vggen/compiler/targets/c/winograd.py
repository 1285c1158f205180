"""C for the Winograd variants of a 3×3 correlation (``vggen.compiler.passes.winograd``).

A matched contraction gets, beside its direct kernel, one variant per tile
size m (``ALGORITHMS``): ``<kernel>_winograd<m>``, with the direct kernel's
signature, so that the runtime may call either (``vggen.runtime.algorithms``).
The variant runs transform → batched matrix product → inverse transform
(``templates/c/winograd.c.j2``):

* every transform is one ``static inline`` function whose statements are
  Z = L X Rᵀ for the matrices of ``vggen.derive.winograd`` (exact rationals,
  printed as float32 literals, the product L X first, then ·Rᵀ, each
  intermediate a local), run over ``VG_NR`` lanes (tiles or channels) at once;
* the n² channel sums per tile are products of packed panels, run by the
  contractions' own micro-kernel (``vg_tile_outer``);
* the reads of the data, the filter taps, ∂L/∂y and the stores are the
  kernel's own IR expressions, printed at the template's index names.

The template holds loops, packing and blocking only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jinja2
import sympy as sp

from vggen.compiler.ir import Kernel
from vggen.compiler.passes.winograd import IN_CHANNEL, OUT_CHANNEL, WinogradMatch, match
from vggen.compiler.symbolic import row_major_offset
from vggen.compiler.targets.base import GeneratedKernel, comment, tidy
from vggen.compiler.targets.c.printer import CPrinter
from vggen.derive.winograd import WinogradTransforms, forward_transforms, weight_gradient_transforms

# The tile sizes m generated for every matched kernel: F(2×2, 3×3) and F(4×4, 3×3)
# (for ∂L/∂w, F(3×3, 2×2) and F(3×3, 4×4)).
ALGORITHMS = (2, 4)


def algorithm_name(m: int) -> str:
    return f"winograd{m}"


def variant_name(kernel: str, m: int) -> str:
    return f"{kernel}_{algorithm_name(m)}"


@dataclass(frozen=True)
class Transform:
    """One printed transform Z = L X Rᵀ: ``X`` read from ``vg_src[(a·cols + b)·vg_ss + vg_t]``,
    ``Z`` written to ``vg_dst[(i·R.rows + j)·vg_ds + vg_t]``."""

    name: str
    what: str
    statements: tuple


def separable(name: str, what: str, L: sp.Matrix, R: sp.Matrix) -> Transform:
    """The statements of Z = L X Rᵀ, X an L.cols × R.cols grid, over one lane."""
    rows, cols = L.cols, R.cols
    X = sp.Matrix(rows, cols, lambda a, b: sp.Symbol(f"vg_x{a}_{b}"))
    Y = sp.Matrix(L.rows, cols, lambda i, b: sp.Symbol(f"vg_y{i}_{b}"))
    aliases = {X[a, b]: f"vg_src[{a * cols + b} * vg_ss + vg_t]" for a in range(rows) for b in range(cols)}
    aliases.update({Y[i, b]: Y[i, b].name for i in range(L.rows) for b in range(cols)})
    p = CPrinter({}, aliases=aliases)
    out = []
    LX = L * X
    for i in range(L.rows):
        for b in range(cols):
            out.append(f"const float {Y[i, b].name} = {p.code(sp.expand(LX[i, b]))};")
    Z = Y * R.T
    for i in range(Z.rows):
        for j in range(Z.cols):
            out.append(f"vg_dst[{i * Z.cols + j} * vg_ds + vg_t] = {p.code(sp.expand(Z[i, j]))};")
    return Transform(name, what, tuple(out))


def _transforms(prefix: str, t: WinogradTransforms) -> dict:
    n = t.n
    return {
        "data": separable(f"{prefix}_data", f"V = Bᵀ d B for {n}×{n} data tiles", t.BT, t.BT),
        "filter": separable(f"{prefix}_filter", f"U = G g Gᵀ for {t.r}×{t.r} filters", t.G, t.G),
        "output": separable(f"{prefix}_output", f"Y = Aᵀ M A, {t.m}×{t.m} outputs", t.AT, t.AT),
    }


@dataclass(frozen=True)
class Access:
    """A tensor access split for a gather: ``tensor[offset + channel·stride]``,
    ``offset`` at channel 0 (the same for every channel, tabled once per tile block)."""

    tensor: str
    offset: str
    stride: str


def _access(read: sp.Indexed, channel: sp.Symbol, tensors: dict, p: CPrinter) -> Access:
    t = tensors[str(read.base.label)]
    offset = row_major_offset(read.indices, t)
    stride = sp.expand(offset).coeff(channel)
    if stride.has(channel) or sp.expand(offset - stride * channel).has(channel):
        raise ValueError(f"{read}: not affine in {channel}")
    return Access(p.ident(t.name), p.code(offset.xreplace({channel: 0})), p.code(stride))


def render_variant(kernel: Kernel, found: WinogradMatch, m: int, env: jinja2.Environment) -> GeneratedKernel:
    """The ``winograd<m>`` variant of ``kernel`` (its direct signature)."""
    name = variant_name(kernel.name, m)
    ir = dataclasses.replace(kernel, name=name)
    t = forward_transforms(m) if found.form == "data" else weight_gradient_transforms(m)
    p = CPrinter(kernel.tensors)
    p.used.update({"vg_tile_outer", "vg_keep", "vg_gather"} | ({"vg_scatter"} if found.form == "data" else set()))
    # the products in bf16 where the library is compiled with VG_BF16 (file.c.j2's VG_BF16_GEMM)
    p.used.update({"vg_bf16_pairs", "vg_tile_outer_bf16", "vg_tile_outer_amx", "vg_amx_granted"})
    lines = comment(ir)
    lines.append(f"  as Winograd {t.name} (points {', '.join(map(str, t.points))}, ∞; "
                 f"vggen.derive.winograd), proved equal by `vggen check`")
    sizes = {role: p.code(e) for role, e in found.sizes.items()}
    text = env.get_template("c/winograd.c.j2").render(
        name=name, comment=lines, params=p.params(ir.args), form=found.form, m=t.m, n=t.n, r=t.r,
        tile=m, sizes=sizes, transforms=_transforms(name, t),
        data=_access(found.data, IN_CHANNEL, kernel.tensors, p), data_inside=p.code(found.data_inside),
        taps=[p.code(e) for row in found.taps for e in row],
        gradient=(_access(found.gradient, OUT_CHANNEL, kernel.tensors, p) if found.gradient is not None
                  else None),
        output=(_access(found.stores[0], OUT_CHANNEL, kernel.tensors, p) if found.form == "data" else None),
        gradient_inside=p.code(found.gradient_inside) if found.gradient_inside is not None else None,
        stores=[p.code(e) for row in found.stores for e in row] if found.form == "filter" else [])
    algorithm = {"name": algorithm_name(m), "replaces": kernel.name, "form": found.form, "tile": m,
                 "transforms": t.name, "points": [str(v) for v in t.points],
                 "sizes": {role: str(e) for role, e in found.sizes.items()}}
    return GeneratedKernel(ir, "c", tidy(text), used=p.used, algorithm=algorithm)


def variants(kernel: Kernel, env: jinja2.Environment) -> list[GeneratedKernel]:
    """The Winograd variants of ``kernel``: one per tile size, none where it is
    not a 3×3 stride-1 correlation."""
    found = match(kernel)
    if found is None:
        return []
    return [render_variant(kernel, found, m, env) for m in ALGORITHMS]


__all__ = ["ALGORITHMS", "Transform", "algorithm_name", "variant_name", "separable", "render_variant",
           "variants"]
