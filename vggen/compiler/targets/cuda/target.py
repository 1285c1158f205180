"""The CUDA target: one self-contained ``.cu`` file per layer.

A contraction that is a matrix product runs as a tiled implicit GEMM
(``contraction="tiled"``, the default: ``targets.cuda.schedule``), its
thread/block schedule (``targets.cuda.mapping``) kept beside it as
``<name>_simple`` (``SIMPLE_SUFFIX``) for a fallback; ``"simple"`` emits only
that one, under the kernel's own name.
"""

from __future__ import annotations

import dataclasses

import jinja2
import sympy as sp

from vggen.compiler.ir import Kernel, KernelClass
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
from vggen.compiler.targets.cuda import mapping
from vggen.compiler.targets.cuda import schedule as tiled_schedule
from vggen.compiler.targets.cuda.constants import RESIDENT_BLOCKS, THREADS
from vggen.compiler.targets.cuda.printer import CudaPrinter
from vggen.compiler.targets.cuda.schedule import TiledGemm, Tuning, tiled_gemm
from vggen.compiler.targets.cuda.winograd import WinogradLaunch
from vggen.compiler.targets.cuda.winograd import render_variant as render_winograd

CONTRACTIONS = ("tiled", "simple")
SIMPLE_SUFFIX = "_simple"


class CudaTarget:
    """CUDA C++ for nvcc or NVRTC (see ``vggen.compiler.targets.base.Target``);
    ``tuning``: the measured tile choices compiled into the tiled kernels."""

    name = "cuda"
    ext = "cu"

    def __init__(self, contraction: str = "tiled", tuning: Tuning | None = None):
        if contraction not in CONTRACTIONS:
            raise ValueError(f"cuda_contraction must be one of {CONTRACTIONS}, not {contraction!r}")
        self.contraction, self.tuning = contraction, tuning

    def prepare(self, kernels: list[Kernel]) -> list[Kernel]:
        return list(kernels)

    def schedule(self, kernel: Kernel) -> mapping.Schedule:
        return mapping.schedule(kernel)

    def tiled(self, kernel: Kernel) -> TiledGemm | None:
        """The kernel's tiled schedule, or None where it runs the simple one;
        with the choices ``tuning`` measured for it."""
        if self.contraction != "tiled" or kernel.cls is not KernelClass.CONTRACTION:
            return None
        g = tiled_gemm(kernel)
        if g is not None and self.tuning is not None:
            g.tuned, g.tuned_on = self.tuning.for_kernel(kernel.name), self.tuning.device
        return g

    def variants(self, kernel: Kernel, env: jinja2.Environment) -> list[GeneratedKernel]:
        """Winograd F(2×2, 3×3) and F(4×4, 3×3) for a 3×3 stride-1 correlation."""
        return winograd.variants(kernel, env, render_winograd)

    def render_kernel(self, kernel: Kernel, env: jinja2.Environment) -> GeneratedKernel:
        """One kernel's code; a tiled one as the tiled GEMM under the kernel's
        name, then its simple schedule as ``<name>_simple``."""
        check_kernel_functions(kernel)
        tiled = self.tiled(kernel)
        if tiled is not None:
            p = CudaPrinter(kernel.tensors, {**kernel.ranges(), **tiled.ranges()})
            text = env.get_template("cuda/contraction_tiled.cu.j2").render(k=kernel, g=tiled, p=p,
                                                                           comment=comment(kernel))
            fallback = self._simple(dataclasses.replace(kernel, name=kernel.name + SIMPLE_SUFFIX), env)
            return GeneratedKernel(kernel, self.name, tidy(text) + fallback.text, tiled, fallback.schedule,
                                   p.used | fallback.used, fallback.name)
        return self._simple(kernel, env)

    def _simple(self, kernel: Kernel, env: jinja2.Environment) -> GeneratedKernel:
        sched = self.schedule(kernel)
        p = CudaPrinter(kernel.tensors, kernel.ranges())
        text = env.get_template(f"cuda/{kernel.cls.value}.cu.j2").render(
            k=kernel, sched=sched, p=p, comment=comment(kernel), resident=RESIDENT_BLOCKS)
        return GeneratedKernel(kernel, self.name, tidy(text), schedule=sched, used=p.used)

    def render_file(self, kernels: list[GeneratedKernel], what: str, env: jinja2.Environment) -> str:
        used = helpers_used(kernels)
        return env.get_template("cuda/file.cu.j2").render(
            kernels=[g.text for g in kernels], definitions=shared_definitions(kernels), what=what, threads=THREADS, used=used, tiled=tiled_schedule,
            functions=function_helpers(used, "static __device__ __forceinline__"))

    def manifest(self, g: GeneratedKernel) -> dict:
        k = g.ir
        if isinstance(g.schedule, WinogradLaunch):
            return {"launch": g.schedule.manifest()}
        out = {"launch": launch(k, g.tiled)}
        if k.cls is KernelClass.CONTRACTION:
            out["cuda_contraction"] = "tiled" if g.tiled is not None else "simple"
        if g.tiled is not None:
            # the same signature and arguments, the thread/block schedule (no workspace)
            out["fallback"] = {"name": g.fallback, "launch": launch(k)}
        return out


def launch(kernel: Kernel, tiled: TiledGemm | None = None) -> dict:
    """CUDA launch shape: blockDim.x = threads (1-D blocks); gridDim.x from the
    sizes (a Python expression in the size names).  "thread" kernels take one
    thread per output element, "block" kernels one block per element
    (``parallel``: the output extents); all stride over the grid, so a capped
    grid is also correct.  "tiled" kernels (``tiled``) take a fixed grid
    (the blocks resident at once, ``grid_any``: any grid.x ≥ 1 is correct)
    and pick their tile configuration and k-splits themselves
    (``targets.cuda.schedule.launch`` adds what they need); so do split
    reductions (``mapping.Schedule.split``), which share that grid out over
    their outputs."""
    sched = mapping.schedule(kernel)
    split = sched.split and tiled is None
    total = sp.Mul(*[lp.extent for lp in kernel.parallel])
    if split:
        grid = str(RESIDENT_BLOCKS)
    elif sched.mode == "block":
        grid = str(total)
    else:
        grid = f"({total} + {THREADS - 1}) // {THREADS}"
    out = {"mode": sched.mode, "threads": THREADS, "block": [THREADS, 1, 1],
           "grid": [grid, "1", "1"], "parallel": [str(lp.extent) for lp in kernel.parallel],
           "elements": str(total), "dynamic_shared_bytes": 0}
    if split:
        # any grid is correct; this one shares its blocks out over the outputs
        out.update(grid_any=True, split_reduction={
            "workspace": f"vg_rws_{kernel.name}", "counters": f"vg_rcount_{kernel.name}",
            "scope": "the kernel's own: launches of it must not run concurrently"})
    if tiled is not None:
        out.update(tiled_schedule.launch(tiled, kernel.name))
    return out
