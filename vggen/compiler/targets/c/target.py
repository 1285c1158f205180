"""The C (OpenMP) target: one library of every kernel, ``vggen_kernels.c`` and its header."""

from __future__ import annotations

import jinja2

from vggen.compiler.ir import Kernel
from vggen.compiler.targets import winograd
from vggen.compiler.targets.base import (
    GeneratedKernel,
    check_kernel_functions,
    comment,
    function_helpers,
    helpers_used,
    shared_definitions,
    tidy,
)
from vggen.compiler.targets.c import schedule as c_schedule
from vggen.compiler.targets.c.coalesce import coalesce_rows
from vggen.compiler.targets.c.printer import CPrinter
from vggen.compiler.targets.c.schedule import C_GEMM_BLOCKS, Schedule
from vggen.compiler.targets.c.winograd import render_variant as render_winograd


class CTarget:
    """C99 with OpenMP (see ``vggen.compiler.targets.base.Target``)."""

    name = "c"
    ext = "c"

    def prepare(self, kernels: list[Kernel]) -> list[Kernel]:
        """Short rows become one vector loop over the plane (``coalesce_rows``)."""
        return [coalesce_rows(k) for k in kernels]

    def schedule(self, kernel: Kernel) -> Schedule:
        return c_schedule.schedule(kernel)

    def printer(self, kernel: Kernel, sched: Schedule) -> CPrinter:
        """The kernel's printer: its tensors, its loop ranges (for the proofs),
        and in row mode the accumulator as an array element."""
        p = CPrinter(kernel.tensors, c_schedule.ranges(kernel, sched))
        if sched.row:
            (r,) = kernel.reductions
            v = kernel.parallel[-1]
            p.aliases[r.acc] = f"{r.acc.name}[{p.code(v.var - v.first)}]"
        return p

    def render_kernel(self, kernel: Kernel, env: jinja2.Environment) -> GeneratedKernel:
        check_kernel_functions(kernel)
        sched = self.schedule(kernel)
        p = self.printer(kernel, sched)
        text = env.get_template(f"c/{kernel.cls.value}.c.j2").render(k=kernel, sched=sched, p=p,
                                                                     comment=comment(kernel))
        return GeneratedKernel(kernel, self.name, tidy(text), schedule=sched, used=p.used)

    def variants(self, kernel: Kernel, env: jinja2.Environment) -> list[GeneratedKernel]:
        """Winograd F(2×2, 3×3) and F(4×4, 3×3) for a 3×3 stride-1 correlation."""
        return winograd.variants(kernel, env, render_winograd)

    def render_file(self, kernels: list[GeneratedKernel], what: str, env: jinja2.Environment) -> str:
        blocks = [", ".join(f"{k} = {v}" for k, v in list(C_GEMM_BLOCKS.items())[i:i + 5])
                  for i in range(0, len(C_GEMM_BLOCKS), 5)]
        used = helpers_used(kernels)
        return env.get_template("c/file.c.j2").render(kernels=[g.text for g in kernels], what=what,
                                                      definitions=shared_definitions(kernels), used=used,
                                                      blocks=blocks, functions=function_helpers(used, "static inline"))

    def manifest(self, g: GeneratedKernel) -> dict:
        k, sched = g.ir, g.schedule
        if sched is None:           # another algorithm's kernel: its own template, no schedule of ours
            return {}
        out = {"vector_loop": str(sched.vector), "row_accumulator": sched.row,
               "interior_split": sched.region is not None, "loops": [lp.var.name for lp in k.parallel]}
        gm = sched.gemm
        if gm is not None:
            out["gemm"] = {
                "m": [lp.var.name for lp in gm.m], "n": [lp.var.name for lp in gm.n],
                "k": [lp.var.name for lp in gm.k],
                "forms": ["outer", "inner"] if gm.inner else ["outer"],
                "blocks": dict(C_GEMM_BLOCKS),
            }
        return {"schedule": out}

    def header(self, kernels: list[GeneratedKernel], env: jinja2.Environment,
               source: str = "vggen_kernels.c") -> str:
        """The C header declaring ``kernels``."""
        protos = [(g.name, comment(g.ir)[0], CPrinter(g.ir.tensors).params(g.ir.args, restrict=False))
                  for g in kernels]
        what = ", ".join(dict.fromkeys(g.ir.layer for g in kernels))
        return env.get_template("c/header.h.j2").render(prototypes=protos, source=source, what=what)
