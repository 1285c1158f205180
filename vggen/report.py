"""The derivations as a document: Markdown with LaTeX math."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import sympy as sp

from .autodiff import derive
from .document import document_equations
from .layers import vgg_layers


def _eq(lhs, rhs) -> str:
    return f"$$ {sp.latex(lhs)} = {sp.latex(rhs)} $$"


def markdown(rows) -> str:
    docs = document_equations()
    out = ["# Math for VGG, derived by vggen", "",
           "Each layer's forward equations are written once; vggen derives every backward "
           "equation from them and proves it equal to the document's where the document has one.",
           ""]
    for layer in vgg_layers():
        bw = derive(layer)
        out += [f"## {layer.name}", "", "Forward:", ""]
        out += [_eq(eq.lhs, eq.rhs) + (f" *({eq.label})*" if eq.label else "") for eq in layer.equations]
        out += [""]
        for g in bw.gradients:
            out += [f"### ∂L/∂{g.of.name}", "", "Derived:", "", _eq(g.equation.lhs, g.equation.rhs), ""]
            for d in (d for d in docs if d.layer == layer.name and d.gradient == g.tensor.name):
                out += [f"Document, eq. {d.number}" + (f" ({d.note})" if d.note else "") + ":", "",
                        _eq(d.lhs, d.expr), ""]
            for r in rows:
                if r.layer == layer.name and r.gradient == f"∂L/∂{g.of.name}":
                    eq = f"eq. {r.equation}" if r.equation else "no document equation"
                    out += [f"- {eq}: **{r.verdict}** ({r.method}; {r.detail}); "
                            f"finite differences {r.fd_error:.1e}"
                            + (f", dot-product test {r.dot_error:.1e}" if r.dot_error is not None else "")]
            out += [""]
    return "\n".join(out)


def write_markdown(path: str | os.PathLike, rows) -> Path:
    """Write atomically: the reader never sees a half-written file."""
    path = Path(path)
    text = markdown(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
