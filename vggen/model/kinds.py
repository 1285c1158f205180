"""The kinds of node the network is made of, one :class:`NodeKind` record each.

A record says everything the network does differently per kind: the forward
layer and its derived backward program (built once, on first use), the
trained parameters and their initialisation, whether the node keeps
BatchNormalization's running statistics, how it runs in evaluation mode, and,
for a fused kind, the run of kinds it replaces.  ``KINDS`` is the registry,
by name; :class:`vggen.model.network.Node` refers to its kind by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from vggen.derive.autodiff import derive
from vggen.frontend import layers
from vggen.frontend.lang import Layer

BN_EPS = layers.BN_EPSILON
BN_MOMENTUM = 0.9


@dataclass(frozen=True, eq=False)
class NodeKind:
    """One kind of node (conv, bn, relu, …): its layers and its rules."""

    name: str
    make_layer: Callable[[], Layer]
    # the layer's trained tensors; a node keys each as "<node name>.<tensor>"
    parameters: tuple[str, ...] = ()
    # (the node's sizes, a generator) -> each parameter's initial host array
    initialise: Callable[[dict, np.random.Generator], dict] | None = None
    # BatchNormalization: running statistics, updated in training and used
    # (as μ and σ²) in evaluation by ``evaluation_kind``'s layer
    statistics: bool = False
    evaluation_kind: str = ""
    # the identity in evaluation mode (dropout): no kernel, y is x
    identity_in_evaluation: bool = False
    reads_labels: bool = False         # the loss: its t is the batch's labels
    output: str = "y"                  # the tensor the next node reads
    parts: tuple[str, ...] = ()        # a fused kind: the run of kinds it replaces

    @cached_property
    def layer(self) -> Layer:
        return self.make_layer()

    @cached_property
    def backward(self) -> Layer:
        return derive(self.layer).program

    @cached_property
    def evaluation_layer(self) -> Layer:
        """A statistics kind's layer with μ and σ² given (eqs. 21–22 on the
        running statistics); a dropout inside it, the identity, left out."""
        return KINDS[self.evaluation_kind].layer.with_given(["mu", "var"])

    @property
    def has_mask(self) -> bool:
        """Whether the layer applies a dropout mask R (drawn per training step)."""
        return "R" in self.layer.by_name


def _convolution_filters(sizes: dict, rng: np.random.Generator) -> dict:
    """N(0, σ = 1/√(9·IC)), the reference's initialisation."""
    ic, oc = sizes["IC"], sizes["OC"]
    return {"w": (rng.standard_normal((oc, ic, 3, 3)) / math.sqrt(9 * ic)).astype(np.float32)}


def _linear_weights(sizes: dict, rng: np.random.Generator) -> dict:
    """N(0, σ = 1/√IC), the reference's initialisation."""
    ic, oc = sizes["IC"], sizes["C"]
    return {"w": (rng.standard_normal((ic, oc)) / math.sqrt(ic)).astype(np.float32)}


def _scale_and_shift(sizes: dict, rng: np.random.Generator) -> dict:
    """γ = 1, β = 0."""
    return {"gamma": np.ones(sizes["C"], np.float32), "beta": np.zeros(sizes["C"], np.float32)}


def _batch_normalization(name: str, make_layer, evaluation_kind: str, parts: tuple = ()) -> NodeKind:
    return NodeKind(name, make_layer, parameters=("gamma", "beta"), initialise=_scale_and_shift,
                    statistics=True, evaluation_kind=evaluation_kind, parts=parts)


KINDS: dict[str, NodeKind] = {k.name: k for k in (
    NodeKind("conv", lambda: layers.convolution2d(1), parameters=("w",),
             initialise=_convolution_filters),
    _batch_normalization("bn", layers.batch_normalization, "bn"),
    _batch_normalization("bn_relu", layers.batch_normalization_relu, "bn_relu",
                         parts=("bn", "relu")),
    _batch_normalization("bn_relu_dropout", layers.batch_normalization_relu_dropout, "bn_relu",
                         parts=("bn", "relu", "dropout")),
    NodeKind("relu", layers.relu),
    NodeKind("dropout", layers.dropout, identity_in_evaluation=True),
    NodeKind("pool", lambda: layers.max_pooling2d(2)),
    NodeKind("linear", layers.linear, parameters=("w",), initialise=_linear_weights),
    NodeKind("loss", layers.softmax_cross_entropy, reads_labels=True, output="L"),
)}

# Kinds with BatchNormalization's running statistics.
BN_KINDS = tuple(name for name, kind in KINDS.items() if kind.statistics)

# The fused kinds, longest run first: each replaces its ``parts``.
FUSED_KINDS = tuple(sorted((k for k in KINDS.values() if k.parts), key=lambda k: -len(k.parts)))


@lru_cache(maxsize=1)
def running_statistics() -> Layer:
    """BatchNormalization's running statistics, updated in place."""
    return layers.batch_normalization_running()


def running_weights(n: int) -> np.ndarray:
    """:func:`running_statistics`' weights ``k = (m, 1 − m, (1 − m) n/(n − 1))``
    for ``n`` values per channel."""
    m = BN_MOMENTUM
    return np.array([m, 1 - m, (1 - m) * (n / (n - 1) if n > 1 else 1.0)], np.float32)


__all__ = ["NodeKind", "KINDS", "BN_KINDS", "FUSED_KINDS", "BN_EPS", "BN_MOMENTUM",
           "running_statistics", "running_weights"]
