"""The VGG of ``shared/vgg-network.md`` (or another model of
:mod:`vggen.model.architecture`), assembled from the generated layer kernels.

Thirteen blocks (Convolution2D without bias → BatchNormalization → ReLU) in
five stages of width C1, 2C1, 4C1, 8C1, 8C1, each stage ending in a 2×2
max pooling; dropout between blocks with the ratios of the table; then
Linear 8C1→8C1 (no bias) → BatchNormalization → ReLU → Dropout → Linear
8C1→classes (no bias) → SoftmaxCrossEntropy.

Every layer runs through one :class:`vggen.runtime.base.Backend`: the forward
``Layer`` objects of :mod:`vggen.frontend.layers` and the backward programs derived by
:func:`vggen.derive.autodiff.derive`.  BatchNormalization after the first Linear
works on the (B, C) activations viewed as (B, C, 1, 1); Linear reads the
(B, 8C1, 1, 1) output of the last pooling viewed as (B, 8C1).  All views are
free (reshapes of contiguous buffers).

Each node is of one kind of :mod:`vggen.model.kinds` (its layers,
parameters, initialisation and evaluation-mode rule).

A user's layer (a model file's ``layer`` entry) is a node of its own kind:
its sizes are read from the activations it receives, its kernels are those
of ``vggen.compile`` for the network's target (``Node.op``), and it runs on
that op's backend (:meth:`Network.backend_for`), whose arrays are the
network's own kind (NumPy on c, CuPy on cuda), so it reads and writes the
same workspace.  Its parameters sit in the flat buffers like the others.

Memory: per batch size, one :class:`vggen.model.workspace.Workspace`
preallocates every activation and saved intermediate the backward reads, the
dropout masks, and two flat gradient buffers that the backward pass
ping-pongs through.  Parameter gradients have their own arrays
(``Network.grads``).

Training mode: BatchNormalization normalises with the batch statistics (the
kernels) and updates running averages, ``r ← 0.9·r + 0.1·batch`` (the
variance made unbiased with n/(n−1), as Chainer and PyTorch do), with the
generated in-place kernel of ``layers.batch_normalization_running``; dropout
masks R are drawn on the host from the caller's ``numpy.random.Generator``
(0 with probability p, else 1/(1−p)), so every backend sees the same masks.
Evaluation mode: dropout is the identity, and BatchNormalization runs the
generated eqs. 21–22 with the running statistics as μ and σ².

Fusion (``fuse=True``; the default on every target but c, see
``FUSE_BY_DEFAULT``): each BatchNormalization → ReLU (→ Dropout) runs as one layer, ``layers.batch_normalization_relu`` or
``…_relu_dropout``, composed from the same equations by ``lang.chain``: the
ReLU and the mask are applied inside BN's elementwise kernel, and the
backward's two kernels fold them into ∂L/∂γ, ∂L/∂β and ∂L/∂x.  Parameter,
statistics and mask names are those of the unfused layers (bn1, drop1), so
checkpoints and masks carry over between the two.

The loss is the batch mean of the per-image losses L(b), so the seed
gradient is ∂(mean)/∂L(b) = 1/B.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vggen.errors import VggenError
from vggen.frontend.lang import Layer
from vggen.model.kinds import (
    BN_EPS,
    BN_KINDS,
    BN_MOMENTUM,
    FUSED_KINDS,
    KINDS,
    NodeKind,
    fit_user_layer,
    running_statistics,
    user_kind,
)
from vggen.model.architecture import DEFAULT, MODELS, Model, load_model
from vggen.model.optim import flat_views
from vggen.model.workspace import Workspace
from vggen.runtime import get_backend
from vggen.runtime.base import Backend

# The seed's network, as entries of vggen.model.architecture (other models: MODELS).
ARCHITECTURE = MODELS[DEFAULT]


# Whether a target runs BN → ReLU (→ Dropout) fused unless told (``fuse=None``).
# Not on c: on the 2-core AVX-512 CPU the fused backward (the mask's select in
# both backward kernels) costs more than ReLU's own pass saves: six alternating
# runs of `vggen bench --target c --width 16 [--no-fuse]` gave a median of
# 1,682 img/s fused against 1,780 apart (no difference measured at width 64).
FUSE_BY_DEFAULT = {"c": False}


@dataclass
class Node:
    """One layer of the network."""

    kind: str                   # a name of KINDS: conv, bn, relu, dropout, pool, linear, loss; bn_relu, …
                                # or "layer", a user's layer
    name: str                   # conv1, bn1, relu1, drop1, pool1, fc1, loss (a fused node: its bn's);
                                # a user's layer: its function's name and a count (swish1)
    sizes: dict                 # every size but B
    in_shape: tuple             # per image, as the layer sees x
    out_shape: tuple            # per image, as the layer sees its output
    params: dict = field(default_factory=dict)   # layer tensor name -> parameter key
    ratio: float = 0.0          # dropout
    members: tuple = ()         # a fused node: the unfused nodes' (kind, name), in order
    user_kind: NodeKind | None = None   # a user's layer: its own kind (not in KINDS)
    op: object = None           # a user's layer: its vggen.compile op, bound by the Network for its target

    @property
    def node_kind(self) -> NodeKind:
        return self.user_kind or KINDS[self.kind]

    @property
    def layer(self) -> Layer:
        return self.node_kind.layer

    @property
    def backward(self) -> Layer:
        """The derived backward program (a bound user's layer: its op's)."""
        return self.op.backward_layer if self.op is not None else self.node_kind.backward

    @property
    def input(self) -> str:
        """The layer's input tensor, which the previous node's output feeds."""
        return self.node_kind.input

    @property
    def output(self) -> str:
        """The layer's output tensor."""
        return self.node_kind.output

    @property
    def has_mask(self) -> bool:
        """Whether the node applies a dropout mask R (drawn per training step)."""
        return self.node_kind.has_mask

    @property
    def mask_name(self) -> str:
        """The dropout's own name (drop3), also inside a fused node."""
        return next((nm for kind, nm in self.members if kind == "dropout"), self.name)

    @property
    def statistics_keys(self) -> tuple[str, str]:
        """The keys of its running mean and variance in ``Network.state``."""
        return f"{self.name}.running_mean", f"{self.name}.running_var"

    def all_sizes(self, batch: int) -> dict:
        return {self.node_kind.batch: batch, **self.sizes}


def _node(kind: str, name: str, sizes: dict, in_shape: tuple, out_shape: tuple, **kw) -> Node:
    """A node of ``kind``, its parameters keyed ``<name>.<tensor>``."""
    params = {t: f"{name}.{t}" for t in KINDS[kind].parameters}
    return Node(kind, name, sizes, in_shape, out_shape, params=params, **kw)


def build_nodes(width: int, classes: int = 10, dropout: bool = True,
                image_shape: tuple = (3, 32, 32), fuse: bool = False,
                model: Model | str = DEFAULT) -> list[Node]:
    """The layers of ``model`` (:mod:`vggen.model.architecture`) in order, with
    their concrete per-image sizes (``fuse``: with :func:`fuse_nodes` applied)."""
    if width < 1:
        raise VggenError(f"width must be a positive integer, got {width}")
    model = load_model(model) if isinstance(model, str) else model
    c, h, w = image_shape
    side = 2 ** model.poolings
    if h % side or w % side:
        raise VggenError(f"images must be a multiple of {side}×{side} for the {model.poolings} "
                         f"2×2 poolings of model {model.name}, got {h}×{w}")
    nodes: list[Node] = []
    count: dict = {}

    def name(prefix):
        count[prefix] = count.get(prefix, 0) + 1
        return f"{prefix}{count[prefix]}"

    def add(kind, prefix, sizes, in_shape, out_shape, **kw):
        nodes.append(_node(kind, name(prefix), sizes, in_shape, out_shape, **kw))

    def per_channel(kind, prefix):           # bn, relu: (C, H, W) in and out
        add(kind, prefix, {"C": c, "H": h, "W": w}, (c, h, w), (c, h, w))

    def pool_fits(h, w):                     # a user's layer before may have made them odd
        if h % 2 or w % 2:
            raise VggenError(f"model {model.name}: pool {count.get('pool', 0) + 1} receives "
                             f"{h}×{w} activations; a 2×2 pooling needs even sides")

    for entry, arg in model.entries:
        if entry in ("block", "conv"):
            oc = arg * width
            add("conv", "conv", {"IC": c, "OC": oc, "H": h, "W": w}, (c, h, w), (oc, h, w))
            c = oc
            if entry == "block":
                per_channel("bn", "bn")
                per_channel("relu", "relu")
        elif entry == "dropout":
            nm = name("drop")
            if dropout:
                nodes.append(_node("dropout", nm, {"C": c, "H": h, "W": w}, (c, h, w), (c, h, w),
                                   ratio=arg))
        elif entry == "pool":
            pool_fits(h, w)
            add("pool", "pool", {"C": c, "HO": h // 2, "WO": w // 2}, (c, h, w), (c, h // 2, w // 2))
            h, w = h // 2, w // 2
        elif entry == "linear":
            oc = classes if arg == "classes" else arg * width
            ic = c * h * w
            add("linear", "fc", {"IC": ic, "C": oc}, (ic,), (oc,))
            c, h, w = oc, 1, 1
        elif entry in ("bn", "relu"):          # after a Linear: (B, C) viewed as (B, C, 1, 1)
            per_channel(entry, entry)
        elif entry == "layer":
            sizes, in_shape, out_shape = fit_user_layer(arg, (c, h, w))
            kind = user_kind(arg)
            nm = name(arg.function)
            nodes.append(Node("layer", nm, sizes, in_shape, out_shape,
                              params={t: f"{nm}.{t}" for t in kind.parameters}, user_kind=kind))
            c, h, w = out_shape if len(out_shape) == 3 else (out_shape[0], 1, 1)
        elif entry == "loss":
            nodes.append(_node("loss", "loss", {"C": c}, (c,), ()))
    return fuse_nodes(nodes) if fuse else nodes


def fuse_nodes(nodes: list[Node]) -> list[Node]:
    """Replace each run of a fused kind's parts by one node of that kind: the
    first node's name, sizes and parameters, the dropout's ratio.  A user's
    layer (kind ``layer``, in no fused kind's parts) is left as it is."""
    out, k = [], 0
    while k < len(nodes):
        for fused in FUSED_KINDS:
            group = nodes[k:k + len(fused.parts)]
            if tuple(n.kind for n in group) == fused.parts:
                first = group[0]
                out.append(Node(fused.name, first.name, first.sizes, first.in_shape,
                                group[-1].out_shape, params=first.params,
                                ratio=max(n.ratio for n in group),
                                members=tuple((n.kind, n.name) for n in group)))
                k += len(fused.parts)
                break
        else:
            out.append(nodes[k])
            k += 1
    return out


def init_parameters(nodes: list[Node], seed: int) -> tuple[dict, dict]:
    """(parameters, BN running statistics) as host float32 arrays, from ``seed``:
    each kind's initialisation in node order; running mean 0, var 1."""
    rng = np.random.default_rng(seed)
    params, state = {}, {}
    for node in nodes:
        kind = node.node_kind
        if kind.initialise is not None:
            for tensor, value in kind.initialise(node.sizes, rng).items():
                params[node.params[tensor]] = value
        if kind.statistics:
            mean, var = node.statistics_keys
            state[mean] = np.zeros(node.sizes["C"], np.float32)
            state[var] = np.ones(node.sizes["C"], np.float32)
    return params, state


@dataclass
class StepResult:
    loss: float          # mean over the batch
    correct: int         # images whose largest logit is their label
    batch: int


class Network:
    """The VGG on one backend: parameters, gradients, BN statistics, workspaces."""

    def __init__(self, backend: Backend | str = "auto", width: int = 64, classes: int = 10,
                 dropout: bool = True, seed: int = 0, image_shape: tuple = (3, 32, 32),
                 fuse: bool | None = None, model: Model | str = DEFAULT):
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        if fuse is None:
            fuse = FUSE_BY_DEFAULT.get(self.backend.name, True)
        self.width, self.classes, self.dropout, self.fuse = width, classes, dropout, fuse
        self.image_shape = tuple(image_shape)
        self.model = load_model(model) if isinstance(model, str) else model
        self.nodes = build_nodes(width, classes, dropout, self.image_shape, fuse=fuse, model=self.model)
        for node in self.nodes:
            if node.node_kind.user is not None:
                node.op = node.node_kind.compile(self.backend.name)
        params, state = init_parameters(self.nodes, seed)
        be = self.backend
        # views into one flat buffer each, so that the optimizer is one kernel (optim.SGD)
        shapes = {k: v.shape for k, v in params.items()}
        self.flat_params, self.params = flat_views(be, shapes)
        self.flat_grads, self.grads = flat_views(be, shapes)
        for k, v in params.items():
            be.copy_in(self.params[k], v)
        self.state = {k: be.asarray(v) for k, v in state.items()}
        self._workspaces: dict = {}
        # --sync-bn over several ranks: a vggen.distributed.syncbn.SyncBatchNormalization, set by TrainStep
        self.sync_batch_norm = None

    # ---- parameters
    def parameter_count(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def host_params(self) -> dict[str, np.ndarray]:
        return {k: np.array(self.backend.to_host(v)) for k, v in self.params.items()}

    def host_state(self) -> dict[str, np.ndarray]:
        return {k: np.array(self.backend.to_host(v)) for k, v in self.state.items()}

    def host_grads(self) -> dict[str, np.ndarray]:
        return {k: np.array(self.backend.to_host(v)) for k, v in self.grads.items()}

    def load(self, params: dict, state: dict | None = None) -> None:
        """Copy host arrays into the parameters (and BN statistics), in place."""
        for group, values in ((self.params, params), (self.state, state or {})):
            for k, v in values.items():
                if k not in group:
                    raise VggenError(f"unknown parameter {k!r} for this network (width {self.width})")
                if tuple(v.shape) != tuple(group[k].shape):
                    raise VggenError(f"parameter {k}: shape {tuple(v.shape)} does not fit this "
                                     f"network's {tuple(group[k].shape)} (width {self.width}?)")
                self.backend.copy_in(group[k], np.ascontiguousarray(v, np.float32))
            missing = set(group) - set(values)
            if values and missing:
                raise VggenError(f"missing parameters: {', '.join(sorted(missing))}")

    def backend_for(self, node: Node) -> Backend:
        """The backend that runs ``node``'s kernels: a user's layer's op's on c and
        cuda; the network's own for every other node, and on numpy, where the op's
        backend takes float64 arrays and the network's evaluates the same
        equations on the network's float32 arrays."""
        if node.op is not None and node.op.target != "numpy":
            return node.op.backend
        return self.backend

    def workspace(self, batch: int, train: bool) -> Workspace:
        key = (batch, train)
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self, batch, train)
        return self._workspaces[key]

    # ---- passes
    def _feed(self, ws: Workspace, images: np.ndarray, labels: np.ndarray) -> None:
        if images.shape != (ws.batch,) + self.image_shape:
            raise VggenError(f"images of shape {images.shape} do not fit the network "
                             f"({ws.batch}, {', '.join(map(str, self.image_shape))})")
        if labels.shape != (ws.batch,):
            raise VggenError(f"labels of shape {labels.shape} do not fit batch {ws.batch}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
            raise VggenError(f"labels must be in 0..{self.classes - 1}")
        self.backend.copy_in(ws.images, images)
        self.backend.copy_in(ws.labels, labels)

    def draw_masks(self, ws: Workspace, rng: np.random.Generator) -> None:
        """Fresh dropout masks: 0 with probability p, else 1/(1−p)."""
        for k, (node, arrays) in enumerate(zip(self.nodes, ws.forward)):
            if not node.has_mask:
                continue
            r = arrays["R"]
            if isinstance(r, np.ndarray):
                host = r
            else:                                   # a device array: drawn into a staging buffer
                host = ws.mask_staging.get(k)
                if host is None:
                    host = ws.mask_staging[k] = np.empty(r.shape, np.float32)
            rng.random(out=host, dtype=np.float32)
            np.greater_equal(host, np.float32(node.ratio), out=host)
            host *= np.float32(1.0 / (1.0 - node.ratio))
            if host is not r:
                self.backend.copy_in(r, host)

    def forward(self, images: np.ndarray, labels: np.ndarray, train: bool = True,
                rng: np.random.Generator | None = None, masks: dict | None = None) -> Workspace:
        """One forward pass; returns the workspace holding every activation.

        ``train``: batch statistics and dropout (masks drawn from ``rng``, or
        given as ``masks`` by node name); else running statistics, no dropout.
        """
        ws = self.prepare(images, labels, train, rng, masks)
        self.launch_forward(ws)
        return ws

    def prepare(self, images: np.ndarray, labels: np.ndarray, train: bool = True,
                rng: np.random.Generator | None = None, masks: dict | None = None) -> Workspace:
        """The workspace of this batch size, with the batch (and in training
        the dropout masks) copied in: everything of a step but the kernels."""
        ws = self.workspace(len(labels), train)
        self._feed(ws, images, labels)
        be = self.backend
        if train and self.dropout:
            if masks is not None:
                for node, arrays in zip(self.nodes, ws.forward):
                    if node.has_mask:
                        be.copy_in(arrays["R"], np.asarray(masks[node.mask_name], np.float32))
            elif rng is not None:
                self.draw_masks(ws, rng)
            else:
                raise VggenError("training with dropout needs a random generator or masks")
        return ws

    def launch_forward(self, ws: Workspace) -> None:
        """The forward kernels on ``ws`` (and in training the running statistics')."""
        be, batch, train = self.backend, ws.batch, ws.train
        for k, (node, arrays) in enumerate(zip(self.nodes, ws.forward)):
            kind = node.node_kind
            if not train and kind.identity_in_evaluation:
                continue                             # y is x in an evaluation workspace
            if not train and kind.statistics:
                self._evaluate_with_running_statistics(node, arrays)
                continue
            if kind.statistics and self.sync_batch_norm is not None:
                self.sync_batch_norm.forward(k, node, arrays, ws)     # global μ, σ² (--sync-bn)
                continue
            self.backend_for(node).run(node.layer, node.all_sizes(batch), arrays)
            if kind.statistics:
                be.run(running_statistics(), {"C": node.sizes["C"]}, ws.running[k])

    def _evaluate_with_running_statistics(self, node: Node, arrays: dict) -> None:
        """The generated eqs. 21–22 with the running statistics as μ and σ²."""
        mean, var = node.statistics_keys
        given = {"mu": self.state[mean], "var": self.state[var]}
        self.backend.run(node.node_kind.evaluation_layer, node.all_sizes(len(arrays["x"])),
                         {**arrays, **given})

    def backward(self, ws: Workspace, after_node: Callable[[int], None] | None = None) -> None:
        """Fill ``grads`` with ∂(mean loss)/∂(parameter) for the last forward on ``ws``.

        ``after_node(k)`` is called once node k's backward kernels are launched, its
        parameter gradients then final (last node first): a data-parallel step starts
        reducing them there, while the backward goes on (vggen.distributed.gradients)."""
        if not ws.train:
            raise VggenError("backward needs a training-mode forward pass")
        for k in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[k]
            skip = (f"g_{node.input}",) if k == 0 else ()
            if node.node_kind.statistics and self.sync_batch_norm is not None:
                self.sync_batch_norm.backward(k, node, ws.backward[k], ws)
            else:
                self.backend_for(node).run(node.backward, node.all_sizes(ws.batch), ws.backward[k], skip=skip)
            if after_node is not None:
                after_node(k)

    def loss_and_correct(self, ws: Workspace, labels: np.ndarray) -> tuple[float, int]:
        """(sum of the per-image losses, images whose largest logit is their
        label): one transfer, the host's one wait for the device in a step."""
        losses, logits = self.backend.to_host_all([ws.losses, ws.logits])
        correct = int((logits.argmax(axis=1) == labels).sum())
        return float(losses.astype(np.float64).sum()), correct

    def step_result(self, ws: Workspace, labels: np.ndarray) -> StepResult:
        """The finished training step's mean loss and correct count; NonFiniteLoss
        when the loss is not finite (before anything uses the gradients)."""
        total, correct = self.loss_and_correct(ws, labels)
        loss = total / len(labels)
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss)
        return StepResult(loss, correct, len(labels))

    def train_step(self, images: np.ndarray, labels: np.ndarray,
                   rng: np.random.Generator | None = None, masks: dict | None = None) -> StepResult:
        """Forward and backward on one batch (no update): ``grads`` filled.

        Raises VggenError when the loss is not finite, before the gradients are
        used for anything.
        """
        ws = self.forward(images, labels, train=True, rng=rng, masks=masks)
        self.backward(ws)
        # read the loss only now: on a GPU the host then waits once per step, at its end
        return self.step_result(ws, labels)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(sum of per-image losses, correct count) in evaluation mode."""
        ws = self.forward(images, labels, train=False)
        return self.loss_and_correct(ws, labels)

    def masks(self, batch: int) -> dict[str, np.ndarray]:
        """The dropout masks of the last training forward of this batch size (host copies)."""
        ws = self.workspace(batch, True)
        return {node.mask_name: self.backend.to_host(a["R"])
                for node, a in zip(self.nodes, ws.forward) if node.has_mask}


class NonFiniteLoss(VggenError):
    def __init__(self, value: float):
        super().__init__(f"the loss is {value}: training diverged")
        self.value = value


__all__ = ["Network", "Node", "Workspace", "StepResult", "NonFiniteLoss", "build_nodes", "fuse_nodes",
           "FUSE_BY_DEFAULT", "init_parameters", "ARCHITECTURE", "BN_EPS", "BN_KINDS", "BN_MOMENTUM"]
