"""Specialise: window sizes (K, S) and constants (ε) become numbers.

Every other size (B, C, H, W, IC, OC, HO, WO) stays a run-time ``int``
argument of the kernels.
"""

from __future__ import annotations

import dataclasses

import sympy as sp

from vggen.errors import VggenError
from vggen.frontend.lang import Layer, Tensor


def specialisation(layer: Layer, specialise: dict | None) -> dict:
    """Symbol → number for the layer's symbols named in ``specialise``.

    Keys may be symbols or names ("K", "S", "epsilon"; "eps" is accepted);
    keys the layer does not use are ignored, so one dict serves every layer.
    Layer constants not named fall back to the layer's default value.
    """
    by_name = {s.name: s for s in set(layer.constants) | layer.size_symbols}
    out = {}
    for key, value in (specialise or {}).items():
        name = key.name if isinstance(key, sp.Symbol) else str(key)
        name = "epsilon" if name == "eps" else name
        if name not in by_name:
            continue
        sym = by_name[name]
        if sym.is_integer:
            if int(value) != value or (sym.is_positive and value <= 0):
                raise VggenError(f"specialise {name}={value!r}: {name} is a positive integer size")
            out[sym] = sp.Integer(int(value))
        else:
            out[sym] = sp.Float(float(value))
    for c, v in layer.constants.items():
        out.setdefault(c, sp.Float(float(v)))
    return out


def specialise_tensor(t: Tensor, subs: dict) -> Tensor:
    """``t`` with its shape and first indices specialised."""
    return dataclasses.replace(t, shape=tuple(sp.expand(s.xreplace(subs)) for s in t.shape),
                               lower=tuple(sp.expand(s.xreplace(subs)) for s in t.lower))
