"""The optimizer, written as equations like the layers: momentum SGD with L2 weight decay.

Over the flat vector of every parameter (index n < N)::

    v(n) ← μ v(n) + g(n) + λ p(n)        (PyTorch's form, no dampening)
    p(n) ← p(n) − η v(n)

p and v are state tensors (:class:`vggen.frontend.lang.Role.STATE`): each equation
reads and overwrites them element by element, so one generated elementwise
kernel updates the whole network in place — one launch per step instead of
several array operations per parameter.  The hyper-parameters are a
3-element tensor ``h = (η, μ, λ)``, not constants, because the learning
rate changes every step (cosine schedule) and μ, λ are options.

The :class:`SGD` driver gives each parameter a view into flat storage
(:func:`flat_views`); a Network allocates its parameters and gradients that
way, so the update runs as that single kernel.  Other dicts of arrays (a
test's) get one launch per array.
"""

from __future__ import annotations

from vggen.frontend.lang import Equation, Layer, Role, Tensor, indices, sizes

(N,) = sizes("N")
(n,) = indices("n")


def sgd_momentum() -> Layer:
    """v ← μ v + g + λ p;  p ← p − η v (the second equation reads the new v)."""
    p = Tensor("p", (N,), Role.STATE, doc="parameters")
    v = Tensor("v", (N,), Role.STATE, doc="momentum")
    g = Tensor("g", (N,), Role.INPUT, differentiable=False, doc="∂L/∂p")
    h = Tensor("h", (3,), Role.INPUT, differentiable=False, doc="η, μ, λ")
    return Layer("SGD", [g, h, p, v], [
        Equation(v[n], h[1] * v[n] + g[n] + h[2] * p[n], "momentum and weight decay"),
        Equation(p[n], p[n] - h[0] * v[n], "step"),
    ])


__all__ = ["sgd_momentum", "N"]
