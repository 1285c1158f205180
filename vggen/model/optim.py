"""The SGD driver: momentum SGD with L2 weight decay in place on a backend's
arrays, through the one generated update kernel of
:func:`vggen.updates.sgd_momentum` (its equations).

:class:`SGD` gives each parameter a view into flat storage
(:func:`flat_views`); a Network allocates its parameters and gradients that
way, so the update runs as that single kernel.  Other dicts of arrays (a
test's) get one launch per array.
"""

from __future__ import annotations

import numpy as np

from vggen.errors import VggenError
from vggen.frontend.lang import Layer
from vggen.frontend.updates import sgd_momentum


def flat_views(backend, shapes: dict) -> tuple:
    """(one zeroed float32 buffer, {name: a C-contiguous view of it with that shape})."""
    total = sum(int(np.prod(s)) for s in shapes.values())
    flat = backend.zeros((total,))
    views, at = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        views[name] = flat[at:at + size].reshape(shape)
        at += size
    return flat, views


class SGD:
    """Momentum SGD with L2 weight decay, in place on the backend's arrays,
    through the generated ``sgd_forward_p_v`` kernel.

    ``flat``: (parameters, gradients) as the flat buffers ``params`` and
    ``grads`` are views of (see :func:`flat_views`): one launch per step.
    Without it, one launch per parameter.
    """

    _layer: Layer | None = None

    def __init__(self, params: dict, grads: dict, backend, momentum: float, weight_decay: float,
                 flat: tuple | None = None):
        self.params, self.grads = params, grads
        self.momentum, self.weight_decay = momentum, weight_decay
        self.backend = backend
        if SGD._layer is None:
            SGD._layer = sgd_momentum()
        self.h = backend.zeros((3,))
        self._h_host = np.zeros(3, np.float32)
        if flat is not None:
            flat_v, self.velocity = flat_views(backend, {k: v.shape for k, v in params.items()})
            self.segments = [(flat[0], flat[1], flat_v)]
        else:
            self.velocity = {k: backend.zeros(v.shape) for k, v in params.items()}
            self.segments = [(params[k].reshape(-1), grads[k].reshape(-1), self.velocity[k].reshape(-1))
                             for k in params]

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        self.launch()

    def set_lr(self, lr: float) -> None:
        """Copy (η, μ, λ) into ``h`` where they changed (η does every step)."""
        h = np.array([lr, self.momentum, self.weight_decay], np.float32)
        if not np.array_equal(h, self._h_host):
            self.backend.copy_in(self.h, h)
            self._h_host = h

    def launch(self) -> None:
        """The update kernel(s), with the ``h`` last set."""
        for p, g, v in self.segments:
            self.backend.run(SGD._layer, {"N": int(p.shape[0])}, {"p": p, "v": v, "g": g, "h": self.h})

    def host_state(self) -> dict:
        return {k: np.array(self.backend.to_host(v)) for k, v in self.velocity.items()}

    def load(self, velocity: dict) -> None:
        for k, v in self.velocity.items():
            if k not in velocity:
                raise VggenError(f"checkpoint has no momentum for parameter {k}")
            self.backend.copy_in(v, np.ascontiguousarray(velocity[k], np.float32))


__all__ = ["flat_views", "SGD"]
