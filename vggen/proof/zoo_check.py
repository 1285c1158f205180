"""``vggen check --layers zoo``: derive every layer of the zoo and check it.

The zoo's layers have no equation in the document to be proved against, so
each row says what can be said of a layer alone: that ``derive`` gives a
gradient for every differentiable input; that every backward equation
applies only functions of the table (one outside it would have no C or
CUDA form); whether each gradient is a gather (no equality guard left over
a summed index: the δ-elimination inverted every access); and that the
gradients pass finite differences (float64, every size small, the sizes
the entry fixes as given).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from vggen.frontend import lang
from vggen.frontend.functions import unknown_function

# every size a zoo layer leaves free, for the finite differences (small, odd)
FD_SIZE = 3


@dataclass
class ZooRow:
    name: str                          # the ZOO key
    layer: str
    gradients: list = field(default_factory=list)    # ∂L/∂x, …
    equations: int = 0                 # backward equations (gradients and the sums they reuse)
    gather: bool | None = None         # every gradient a gather (None: not derived)
    fd_error: float | None = None
    verdict: str = "fail"
    detail: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def gather_form(eq) -> bool:
    """No equality guard (δ or ``Eq``) that ties a summed index is left, and
    every subscript is integer arithmetic.  A δ against data (max pooling's
    saved selection) is a test of a value, not of an index: it is allowed."""
    summed = {v for s in eq.rhs.atoms(sp.Sum) for v in s.variables}
    for rel in eq.rhs.atoms(sp.Eq, sp.KroneckerDelta):
        if rel.atoms(sp.Indexed):
            continue
        if rel.free_symbols & summed:
            return False
    return all(lang.integer_index(ix) for acc in eq.rhs.atoms(sp.Indexed) for ix in acc.indices)


def _fd_sizes(layer, fixed: dict) -> dict:
    consts = {s: FD_SIZE for s in layer.size_symbols if s not in layer.constants}
    by_name = {s.name: s for s in consts}
    consts.update({by_name[k]: v for k, v in fixed.items() if k in by_name})
    consts.update({c: v for c, v in layer.constants.items()})
    return consts


def check_entry(name: str, entry, seed: int = 0) -> ZooRow:
    """One zoo entry derived and checked (see the module docstring); never raises."""
    from vggen.derive.autodiff import derive
    from vggen.proof.verify import finite_difference_error

    row = ZooRow(name, name)
    try:
        layer = entry.layer()
        row.layer = layer.name
        bw = derive(layer)
        row.gradients = [f"∂L/∂{g.of.name}" for g in bw.gradients]
        row.equations = len(bw.program.equations)
        missing = {t.name for t in layer.differentiable_inputs} - {g.of.name for g in bw.gradients}
        if missing:
            row.detail = f"no gradient for {', '.join(sorted(missing))}"
            return row
        for eq in bw.program.equations:
            bad = unknown_function(eq.rhs)
            if bad is not None:
                row.detail = f"{eq.lhs.base.label}: function {type(bad).__name__} ({bad}) has no C/CUDA form"
                return row
        row.gather = all(gather_form(g.equation) for g in bw.gradients)
        errors = finite_difference_error(layer, bw, _fd_sizes(layer, entry.sizes), np.random.default_rng(seed))
        row.fd_error = max(errors.values(), default=0.0)
        if row.fd_error >= 1e-5:
            row.detail = f"finite differences {row.fd_error:.2g}"
            return row
        row.verdict = "pass"
        row.detail = "" if row.gather else "a gradient keeps an equality guard over a summed index"
    except Exception as e:     # noqa: BLE001 - a layer that cannot be derived is a row, not a crash
        row.detail = f"{type(e).__name__}: {e}".splitlines()[0]
    return row


def check_zoo(zoo: dict | None = None) -> list[ZooRow]:
    """One row per zoo entry, in order."""
    if zoo is None:
        from vggen.frontend.zoo import ZOO as zoo
    return [check_entry(name, entry) for name, entry in zoo.items()]


def format_rows(rows: list[ZooRow]) -> str:
    header = ("zoo", "layer", "gradients", "backward eqs", "gather", "finite diff.", "verdict", "detail")
    table = [(r.name, r.layer, ", ".join(r.gradients) or "—", str(r.equations) if r.gradients else "—",
              {True: "yes", False: "no", None: "—"}[r.gather],
              "—" if r.fd_error is None else f"{r.fd_error:.1e}", r.verdict, r.detail) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header] + table]
    failed = sum(r.verdict != "pass" for r in rows)
    return "\n".join(lines) + f"\n\n{len(rows) - failed} derived and checked, {failed} failed\n"


__all__ = ["ZooRow", "check_entry", "check_zoo", "format_rows", "gather_form"]
