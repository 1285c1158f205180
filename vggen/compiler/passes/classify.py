"""Classify: which template a kernel's loop nest takes (``KernelClass``)."""

from __future__ import annotations

from vggen.compiler.ir import KernelClass, Stage
from vggen.compiler.passes.fuse import stage_kind


def classify(stages: list[Stage]) -> KernelClass:
    kinds = {stage_kind(s) for s in stages}
    if "argmax" in kinds:
        return KernelClass.WINDOW_ARGMAX
    if "contract" in kinds:
        return KernelClass.CONTRACTION
    if "reduce" in kinds:
        if any(r.op == "max" for s in stages for r in s.reductions):
            return KernelClass.ROW_SOFTMAX
        return KernelClass.REDUCTION
    return KernelClass.ELEMENTWISE
