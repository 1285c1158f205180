"""The reference target: a layer's own equations evaluated in float64 with
:class:`vggen.proof.evaluate.Evaluator` (correctness over speed), in slabs of the
first output axis so that the broadcast intermediates stay within a memory
budget."""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from vggen.frontend.lang import REDUCTIONS, Equation
from vggen.proof.evaluate import Evaluator
from vggen.runtime.base import Backend, Program, check_argument, concrete

_BUDGET = 1 << 23       # float64 elements per broadcast intermediate (64 MiB)


def reduction_extent(eq: Equation, consts: dict) -> int:
    """Elements a reduction of ``eq`` broadcasts over, per output element (at most)."""
    worst = 1
    for node in eq.rhs.atoms(*REDUCTIONS):
        n = 1
        for _, lo, hi in node.limits:
            n *= max(1, concrete(hi, consts) - concrete(lo, consts) + 1)
        worst = max(worst, n)
    return worst


class NumpyProgram(Program):
    """Evaluates the equations themselves: the reference semantics."""

    def __init__(self, backend, layer, sizes):
        super().__init__(backend, layer, sizes)
        self.lower = {t.name: tuple(concrete(lo, self.consts) for lo in t.lower)
                      for t in layer.tensors}
        self.chunks = {}
        for eq in layer.equations:
            shape = self.shapes[eq.target]
            per_row = math.prod(shape[1:]) * reduction_extent(eq, self.consts)
            self.chunks[eq.target] = max(1, min(shape[0], _BUDGET // max(1, per_row)))
        readers = {}
        for eq in layer.equations:
            for acc in eq.rhs.atoms(sp.Indexed):
                readers.setdefault(str(acc.base.label), set()).add(eq.target)
        self.readers = readers

    def run(self, env: dict, skip: frozenset) -> None:
        for name in self.inputs:
            check_argument(self.name, name, env[name], self.shapes[name], self.dtypes[name])
        for name in self.outputs:
            check_argument(self.name, name, env[name], self.shapes[name], self.dtypes[name])
        work = {n: env[n].astype(np.float64) if self.dtypes[n].kind == "f" else env[n]
                for n in self.inputs}
        ev = Evaluator(work, self.consts, self.lower, np.float64)
        for eq in self.layer.equations:
            name = eq.target
            if name in skip and not self.readers.get(name):
                continue
            shape, first, step = self.shapes[name], self.lower[name], self.chunks[name]
            out = np.empty(shape, np.float64 if self.dtypes[name].kind == "f" else np.int64)
            for start in range(0, shape[0], step):
                n = min(step, shape[0] - start)
                out[start:start + n] = ev.equation(eq, (n,) + shape[1:],
                                                   (first[0] + start,) + first[1:])
            work[name] = out
            np.copyto(env[name], out, casting="unsafe")


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, allow_modified_kernels: bool = False):
        # no generated sources to hold to the manifest: the option is accepted, and moot
        super().__init__()

    def _prepare(self, layer, sizes):
        return NumpyProgram(self, layer, sizes)
