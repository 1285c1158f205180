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
from vggen.compiler.passes.winograd import IN_CHANNEL, OUT_CHANNEL, WinogradMatch
from vggen.compiler.symbolic import row_major_offset
from vggen.compiler.targets.base import GeneratedKernel, tidy
from vggen.compiler.targets.c.printer import CPrinter
from vggen.compiler.targets.winograd import (
    algorithm_entry,
    comment_lines,
    definitions,
    shift,
    transforms,
    transforms_for,
    variant_name,
)

# where a transform's lane t reads element e and writes it (VG_NR lanes at once)
SOURCE, RESULT = "vg_src[{e} * vg_ss + vg_t]", "vg_dst[{e} * vg_ds + vg_t]"

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
    t = transforms_for(found, m)
    fns = transforms(t, CPrinter, SOURCE, RESULT)
    p = CPrinter(kernel.tensors)
    p.used.update({"vg_tile_outer", "vg_keep", "vg_gather"} | ({"vg_scatter"} if found.form == "data" else set()))
    # the products in bf16 where the library is compiled with VG_BF16 (file.c.j2's VG_BF16_GEMM)
    p.used.update({"vg_bf16_pairs", "vg_tile_outer_bf16", "vg_tile_outer_amx", "vg_amx_granted"})
    lines = comment_lines(ir, t)
    sizes = {role: p.code(e) for role, e in found.sizes.items()}
    text = env.get_template("c/winograd.c.j2").render(
        name=name, comment=lines, params=p.params(ir.args), form=found.form, m=t.m, n=t.n, r=t.r,
        tile=m, sizes=sizes, origin=shift(found.origin), transforms=fns,
        data=_access(found.data, IN_CHANNEL, kernel.tensors, p), data_inside=p.code(found.data_inside),
        taps=[p.code(e) for row in found.taps for e in row],
        gradient=(_access(found.gradient, OUT_CHANNEL, kernel.tensors, p) if found.gradient is not None
                  else None),
        output=(_access(found.stores[0], OUT_CHANNEL, kernel.tensors, p) if found.form == "data" else None),
        gradient_inside=p.code(found.gradient_inside) if found.gradient_inside is not None else None,
        stores=[p.code(e) for row in found.stores for e in row] if found.form == "filter" else [])
    return GeneratedKernel(ir, "c", tidy(text), used=p.used, algorithm=algorithm_entry(kernel, found, t, m),
                           definitions=definitions(fns, env.get_template("c/winograd_transform.c.j2")))



__all__ = ["Access", "render_variant"]
