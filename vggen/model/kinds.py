"""The kinds of node the network is made of, one :class:`NodeKind` record each.

A record says everything the network does differently per kind: the forward
layer and its derived backward program (built once, on first use), the
trained parameters and their initialisation, whether the node keeps
BatchNormalization's running statistics, how it runs in evaluation mode, and,
for a fused kind, the run of kinds it replaces.  ``KINDS`` is the registry,
by name; :class:`vggen.model.network.Node` refers to its kind by name.

A user's layer (the ``layer`` entry of :mod:`vggen.model.architecture`) is a
kind of its own, made per node by :func:`user_kind` and held by its node
rather than registered: its layer is the user's, its kernels those of
``vggen.compile`` for the network's target, its sizes read from the
activations it receives (:func:`fit_user_layer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial

import numpy as np
import sympy as sp

from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend import layers
from vggen.frontend.lang import Layer
from vggen.runtime.base import size_values, tensor_shapes

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
    input: str = "x"                   # the tensor the previous node's output feeds
    output: str = "y"                  # the tensor the next node reads
    batch: str = "B"                   # the batch size's name
    parts: tuple[str, ...] = ()        # a fused kind: the run of kinds it replaces
    # a user's layer (vggen.model.architecture.UserLayer): compiled by
    # vggen.compile for the network's target, never fused
    user: object = None

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
        return self.user is None and "R" in self.layer.by_name

    def compile(self, target: str):
        """A user's layer as a ``vggen.compile`` op for ``target`` (from its cache
        when compiled before); a failure names the model file's line."""
        from vggen.ops import compile as compile_layer

        try:
            return compile_layer(self.layer, target, sizes=self.user.sizes)
        except VggenError as e:
            raise VggenError(f"{self.user.where}: {e}") from None


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


# --------------------------------------------------------------------------- a user's layer


def default_initialisation(shapes: dict, rng: np.random.Generator) -> dict:
    """A user's parameters when its layer file defines no ``initialise_<FUNCTION>``:
    rank ≤ 1 ones, others N(0, σ = 1/√fan_in) with fan_in = size / shape[0].

    A rank-1 parameter is most often a per-channel scale (γ, a slope β):
    ones start the layer as its unscaled function, where zeros would start
    it as the zero map.  A larger one is most often a weight whose first
    dimension is its outputs (OC×IC×K×K, C×K×K), and 1/√fan_in keeps the
    activations' scale through it, as the shipped convolutions' N(0, 1/√(9·IC))
    does.  A layer that wants otherwise (a bias at 0, a (IC, OC) matrix)
    defines its initialiser."""
    out = {}
    for name, shape in shapes.items():
        if len(shape) <= 1:
            out[name] = np.ones(shape, np.float32)
        else:
            fan_in = math.prod(shape) // shape[0]
            out[name] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    return out


def _user_parameters(user, sizes: dict, rng: np.random.Generator) -> dict:
    """The initial host arrays of a user's parameters at ``sizes``, checked."""
    shapes = tensor_shapes(user.layer, size_values(user.layer, {user.batch: 1, **sizes}))
    wanted = {name: shapes[name] for name in user.parameters}
    own = user.initialise
    what = f"{user.where}: initialise_{user.function} of {user.path.name}"
    if own is None:
        return default_initialisation(wanted, rng)
    try:
        given = own(dict(wanted), rng)
    except Exception as e:
        from vggen.model.architecture import exception_line

        raise VggenError(f"{what} raised {exception_line(e, user.path)}") from None
    if not isinstance(given, dict) or set(given) != set(wanted):
        got = ", ".join(sorted(map(str, given))) if isinstance(given, dict) else type(given).__name__
        raise VggenError(f"{what} must return a dict of {', '.join(wanted) or 'nothing'}, got {got}")
    out = {}
    for name, shape in wanted.items():
        try:
            a = np.asarray(given[name], dtype=np.float32)
        except (TypeError, ValueError):
            raise VggenError(f"{what}: {name} is no array of numbers") from None
        if a.shape != shape or not np.isfinite(a).all():
            raise VggenError(f"{what}: {name} must be a finite array of shape {shape}, "
                             f"got {'shape ' + str(a.shape) if a.shape != shape else 'non-finite values'}")
        out[name] = np.ascontiguousarray(a)
    return out


def user_kind(user) -> NodeKind:
    """The kind of a node running ``user`` (a :class:`vggen.model.architecture.UserLayer`)."""
    return NodeKind("layer", lambda: user.layer, parameters=user.parameters,
                    initialise=partial(_user_parameters, user) if user.parameters else None,
                    input=user.input, output=user.output, batch=user.batch, user=user)


def fit_user_layer(user, activations: tuple) -> tuple[dict, tuple, tuple]:
    """(sizes but the batch, input shape, output shape per image) of ``user``'s
    layer reading ``activations`` (C, H, W) per image: its sizes read from them
    (flattened when the input is (B, features)) and from the fixed ones."""
    from vggen.ops import UntoldSizes, infer_sizes

    layer = user.layer
    x = layer.tensor(user.input)
    in_shape = tuple(activations) if x.rank == 4 else (math.prod(activations),)
    symbols = {s.name: s for s in layer.size_symbols | set(layer.constants)}
    fixed = {symbols[name]: value for name, value in user.sizes.items()}
    shown = "(B, " + ", ".join(map(str, in_shape)) + ")"
    needed = {s for s in layer.size_symbols if s not in layer.constants}
    try:
        found = infer_sizes(layer.name, [(x.name, x.shape, (1,) + in_shape)], fixed, needed)
    except UntoldSizes as e:
        # the sizes that are no tensor's whole dimension (a stride) are those to give
        whole = {d.name for t in layer.tensors for d in t.shape if isinstance(d, sp.Symbol)}
        hint = next((name for name in e.names if name not in whole), e.names[0])
        raise VggenError(f"{user.where}: the input {shown} does not tell {', '.join(e.names)} of "
                         f"{user}: give {'it' if len(e.names) == 1 else 'what fixes them'} on the "
                         f"line as NAME=VALUE ({hint}=...)") from None
    except VggenError as e:
        raise VggenError(f"{user.where}: {user} does not fit its input {shown}: {e}") from None
    found.pop(user.batch, None)
    try:
        shapes = tensor_shapes(layer, size_values(layer, {user.batch: 1, **found}))
    except VggenError as e:
        raise VggenError(f"{user.where}: {user} with input {shown}: {e}") from None
    return found, in_shape, shapes[user.output][1:]


__all__ = ["NodeKind", "KINDS", "BN_KINDS", "FUSED_KINDS", "BN_EPS", "BN_MOMENTUM",
           "running_statistics", "running_weights", "user_kind", "fit_user_layer",
           "default_initialisation"]
