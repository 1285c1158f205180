"""The VGG of ``shared/vgg-network.md``, assembled from the generated layer kernels.

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

Memory: per batch size, one :class:`Workspace` preallocates every activation
and saved intermediate the backward reads, the dropout masks, and two flat
gradient buffers that the backward pass ping-pongs through (∂L/∂y of one
layer is ∂L/∂x of the next, so only two activation-sized gradients are ever
alive).  Parameter gradients have their own arrays (``Network.grads``).

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
from dataclasses import dataclass, field

import numpy as np

from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend import layers
from vggen.frontend.lang import Layer
from vggen.model.optim import flat_views
from vggen.runtime import get_backend
from vggen.runtime.base import Backend

BN_EPS = layers.BN_EPSILON
BN_MOMENTUM = 0.9

# (kind, argument): "block" multiplies of C1, "dropout" ratios, "pool".
ARCHITECTURE = (
    ("block", 1), ("dropout", 0.3), ("block", 1), ("pool", None),
    ("block", 2), ("dropout", 0.4), ("block", 2), ("pool", None),
    ("block", 4), ("dropout", 0.4), ("block", 4), ("dropout", 0.4), ("block", 4), ("pool", None),
    ("block", 8), ("dropout", 0.4), ("block", 8), ("dropout", 0.4), ("block", 8), ("pool", None),
    ("block", 8), ("dropout", 0.4), ("block", 8), ("dropout", 0.4), ("block", 8), ("pool", None),
    ("dropout", 0.5), ("linear", 8), ("bn", None), ("relu", None), ("dropout", 0.5),
    ("linear", "classes"), ("loss", None),
)


# Whether a target runs BN → ReLU (→ Dropout) fused unless told (``fuse=None``).
# Not on c: on the 2-core AVX-512 CPU the fused backward (the mask's select in
# both backward kernels) costs more than ReLU's own pass saves: six alternating
# runs of `vggen bench --target c --width 16 [--no-fuse]` gave a median of
# 1,682 img/s fused against 1,780 apart (no difference measured at width 64).
FUSE_BY_DEFAULT = {"c": False}

# Kinds with BatchNormalization's statistics (running averages, evaluation mode).
BN_KINDS = ("bn", "bn_relu", "bn_relu_dropout")


class _Kinds:
    """One Layer object (and its derived backward) per layer kind, built once."""

    _cache: dict = {}
    _make = {"conv": lambda: layers.convolution2d(1),
             "bn": layers.batch_normalization,
             "bn_relu": layers.batch_normalization_relu,
             "bn_relu_dropout": layers.batch_normalization_relu_dropout,
             "relu": layers.relu,
             "dropout": layers.dropout,
             "pool": lambda: layers.max_pooling2d(2),
             "linear": layers.linear,
             "loss": layers.softmax_cross_entropy}

    @classmethod
    def get(cls, kind: str) -> tuple[Layer, Layer]:
        if kind not in cls._cache:
            layer = cls._make[kind]()
            cls._cache[kind] = (layer, derive(layer).program)
        return cls._cache[kind]

    @classmethod
    def running(cls) -> Layer:
        """BatchNormalization's running statistics, updated in place."""
        if "running" not in cls._cache:
            cls._cache["running"] = layers.batch_normalization_running()
        return cls._cache["running"]

    @classmethod
    def batchnorm_eval(cls, kind: str = "bn") -> Layer:
        """A BN kind with μ and σ² given (eqs. 21–22 on the running statistics);
        dropout, the identity at evaluation, left out."""
        key = f"{kind}:eval"
        if key not in cls._cache:
            base = "bn_relu" if kind == "bn_relu_dropout" else kind
            cls._cache[key] = cls.get(base)[0].with_given(["mu", "var"])
        return cls._cache[key]


@dataclass
class Node:
    """One layer of the network."""

    kind: str                   # conv, bn, relu, dropout, pool, linear, loss; bn_relu, bn_relu_dropout
    name: str                   # conv1, bn1, relu1, drop1, pool1, fc1, loss (a fused node: its bn's)
    layer: Layer
    backward: Layer
    sizes: dict                 # every size but B
    in_shape: tuple             # per image, as the layer sees x
    out_shape: tuple            # per image, as the layer sees its output
    params: dict = field(default_factory=dict)   # layer tensor name -> parameter key
    ratio: float = 0.0          # dropout
    output: str = "y"           # the layer's output tensor
    members: tuple = ()         # a fused node: the unfused nodes' (kind, name), in order

    @property
    def has_mask(self) -> bool:
        """Whether the node applies a dropout mask R (drawn per training step)."""
        return "R" in self.layer.by_name

    @property
    def mask_name(self) -> str:
        """The dropout's own name (drop3), also inside a fused node."""
        return next((nm for kind, nm in self.members if kind == "dropout"), self.name)

    def all_sizes(self, batch: int) -> dict:
        return {"B": batch, **self.sizes}


def build_nodes(width: int, classes: int = 10, dropout: bool = True,
                image_shape: tuple = (3, 32, 32), fuse: bool = False) -> list[Node]:
    """The network's layers in order, with their concrete per-image sizes
    (``fuse``: with :func:`fuse_nodes` applied)."""
    if width < 1:
        raise VggenError(f"width must be a positive integer, got {width}")
    c, h, w = image_shape
    if h % 32 or w % 32:
        raise VggenError(f"images must be a multiple of 32×32 for five 2×2 poolings, got {h}×{w}")
    nodes: list[Node] = []
    count: dict = {}

    def name(prefix):
        count[prefix] = count.get(prefix, 0) + 1
        return f"{prefix}{count[prefix]}"

    def add(kind, nm, sizes, in_shape, out_shape, **kw):
        layer, backward = _Kinds.get(kind)
        nodes.append(Node(kind, nm, layer, backward, sizes, in_shape, out_shape, **kw))

    def bn_relu(ch, hh, ww):
        bn = name("bn")
        add("bn", bn, {"C": ch, "H": hh, "W": ww}, (ch, hh, ww), (ch, hh, ww),
            params={"gamma": f"{bn}.gamma", "beta": f"{bn}.beta"})
        add("relu", name("relu"), {"C": ch, "H": hh, "W": ww}, (ch, hh, ww), (ch, hh, ww))

    for kind, arg in ARCHITECTURE:
        if kind == "block":
            oc = arg * width
            conv = name("conv")
            add("conv", conv, {"IC": c, "OC": oc, "H": h, "W": w}, (c, h, w), (oc, h, w),
                params={"w": f"{conv}.w"})
            c = oc
            bn_relu(c, h, w)
        elif kind == "dropout":
            nm = name("drop")
            if dropout:
                add("dropout", nm, {"C": c, "H": h, "W": w}, (c, h, w), (c, h, w), ratio=arg)
        elif kind == "pool":
            add("pool", name("pool"), {"C": c, "HO": h // 2, "WO": w // 2}, (c, h, w),
                (c, h // 2, w // 2))
            h, w = h // 2, w // 2
        elif kind == "linear":
            oc = classes if arg == "classes" else arg * width
            fc = name("fc")
            ic = c * h * w
            add("linear", fc, {"IC": ic, "C": oc}, (ic,), (oc,), params={"w": f"{fc}.w"})
            c, h, w = oc, 1, 1
        elif kind == "bn":
            bn = name("bn")
            add("bn", bn, {"C": c, "H": 1, "W": 1}, (c, 1, 1), (c, 1, 1),
                params={"gamma": f"{bn}.gamma", "beta": f"{bn}.beta"})
        elif kind == "relu":
            add("relu", name("relu"), {"C": c, "H": 1, "W": 1}, (c, 1, 1), (c, 1, 1))
        elif kind == "loss":
            add("loss", "loss", {"C": c}, (c,), (), output="L")
    return fuse_nodes(nodes) if fuse else nodes


# Runs of node kinds that one composed layer replaces (longest first).
FUSIONS = ((("bn", "relu", "dropout"), "bn_relu_dropout"), (("bn", "relu"), "bn_relu"))


def fuse_nodes(nodes: list[Node]) -> list[Node]:
    """Replace each run of FUSIONS by one node of the composed layer: the
    first node's name, sizes and parameters, the dropout's ratio."""
    out, k = [], 0
    while k < len(nodes):
        for run, kind in FUSIONS:
            group = nodes[k:k + len(run)]
            if tuple(n.kind for n in group) == run:
                layer, backward = _Kinds.get(kind)
                first = group[0]
                out.append(Node(kind, first.name, layer, backward, first.sizes, first.in_shape,
                                group[-1].out_shape, params=first.params,
                                ratio=max(n.ratio for n in group),
                                members=tuple((n.kind, n.name) for n in group)))
                k += len(run)
                break
        else:
            out.append(nodes[k])
            k += 1
    return out


def init_parameters(nodes: list[Node], seed: int) -> tuple[dict, dict]:
    """(parameters, BN running statistics) as host float32 arrays, from ``seed``.

    Convolution filters ~ N(0, σ = 1/√(9·IC)), Linear weights ~ N(0, σ = 1/√IC)
    (the reference's initialisation); γ = 1, β = 0; running mean 0, var 1.
    """
    rng = np.random.default_rng(seed)
    params, state = {}, {}
    for node in nodes:
        if node.kind == "conv":
            ic, oc = node.sizes["IC"], node.sizes["OC"]
            params[node.params["w"]] = (rng.standard_normal((oc, ic, 3, 3))
                                        / math.sqrt(9 * ic)).astype(np.float32)
        elif node.kind == "linear":
            ic, oc = node.sizes["IC"], node.sizes["C"]
            params[node.params["w"]] = (rng.standard_normal((ic, oc)) / math.sqrt(ic)).astype(np.float32)
        elif node.kind in BN_KINDS:
            ch = node.sizes["C"]
            params[node.params["gamma"]] = np.ones(ch, np.float32)
            params[node.params["beta"]] = np.zeros(ch, np.float32)
            state[f"{node.name}.running_mean"] = np.zeros(ch, np.float32)
            state[f"{node.name}.running_var"] = np.ones(ch, np.float32)
    return params, state


class Workspace:
    """Every array one batch size needs, allocated once."""

    def __init__(self, net: "Network", batch: int, train: bool):
        be = net.backend
        self.batch, self.train = batch, train
        self.images = be.zeros((batch,) + net.image_shape)
        self.labels = be.zeros((batch,), np.int32)
        self.forward: list[dict] = []      # per node: the arrays of its forward program
        self.backward: list[dict] = []     # per node: the arrays of its backward program
        self.running: dict = {}            # per BN node index: its running statistics' update
        self.mask_staging: dict = {}       # per masked node index: the host buffer its mask is drawn in
        x = self.images
        for node in net.nodes:
            prog = be.program(node.layer, node.all_sizes(batch))
            arrays = {"x": x.reshape(prog.shapes["x"])}
            if node.kind == "loss":
                arrays["t"] = self.labels
            if node.kind == "dropout" and not train:
                arrays["y"] = arrays["x"]          # the identity: no copy, no kernel
                self.forward.append(arrays)
                continue
            if node.has_mask and train:
                arrays["R"] = be.zeros(prog.shapes["R"])
            for tname, key in node.params.items():
                arrays[tname] = net.params[key]
            for out in prog.outputs:
                if node.kind in BN_KINDS and not train and out in ("mu", "var"):
                    continue
                arrays[out] = be.zeros(prog.shapes[out], prog.dtypes[out])
            if node.kind in BN_KINDS and train:
                n = batch * node.sizes["H"] * node.sizes["W"]
                m = BN_MOMENTUM
                weights = np.array([m, 1 - m, (1 - m) * (n / (n - 1) if n > 1 else 1.0)], np.float32)
                self.running[len(self.forward)] = {
                    "mu": arrays["mu"], "var": arrays["var"], "k": be.asarray(weights),
                    "running_mean": net.state[f"{node.name}.running_mean"],
                    "running_var": net.state[f"{node.name}.running_var"]}
            self.forward.append(arrays)
            x = arrays[node.output]
        self.logits = self.forward[-1]["x"]
        self.losses = self.forward[-1]["L"]
        self.seed = be.zeros((batch,))
        self.seed[...] = 1.0 / batch
        if not train:
            return
        # Gradients: ∂L/∂y of node k is ∂L/∂x of node k+1; ping-pong two flat buffers.
        biggest = max(math.prod(node.in_shape) for node in net.nodes) * batch
        flat = [be.zeros((biggest,)), be.zeros((biggest,))]
        g_y, turn = self.seed, 0
        self.backward = [None] * len(net.nodes)
        for k in range(len(net.nodes) - 1, -1, -1):
            node = net.nodes[k]
            prog = be.program(node.backward, node.all_sizes(batch))
            arrays = {n: a for n, a in self.forward[k].items()}
            seed_name = f"g_{node.output}"
            arrays[seed_name] = g_y.reshape(prog.shapes[seed_name])
            n = math.prod(prog.shapes["g_x"])
            arrays["g_x"] = flat[turn][:n].reshape(prog.shapes["g_x"])
            for tname, key in node.params.items():
                arrays[f"g_{tname}"] = net.grads[key]
            self.backward[k] = arrays
            g_y, turn = arrays["g_x"], 1 - turn


@dataclass
class StepResult:
    loss: float          # mean over the batch
    correct: int         # images whose largest logit is their label
    batch: int


class Network:
    """The VGG on one backend: parameters, gradients, BN statistics, workspaces."""

    def __init__(self, backend: Backend | str = "auto", width: int = 64, classes: int = 10,
                 dropout: bool = True, seed: int = 0, image_shape: tuple = (3, 32, 32),
                 fuse: bool | None = None):
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        if fuse is None:
            fuse = FUSE_BY_DEFAULT.get(self.backend.name, True)
        self.width, self.classes, self.dropout, self.fuse = width, classes, dropout, fuse
        self.image_shape = tuple(image_shape)
        self.nodes = build_nodes(width, classes, dropout, self.image_shape, fuse=fuse)
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
            if node.kind == "dropout" and not train:
                continue                             # y is x in an evaluation workspace
            if node.kind in BN_KINDS and not train:
                self._bn_eval(node, arrays)
                continue
            be.run(node.layer, node.all_sizes(batch), arrays)
            if node.kind in BN_KINDS:
                be.run(_Kinds.running(), {"C": node.sizes["C"]}, ws.running[k])

    def _bn_eval(self, node: Node, arrays: dict) -> None:
        """The generated eqs. 21–22 with the running statistics as μ and σ²."""
        given = {"mu": self.state[f"{node.name}.running_mean"],
                 "var": self.state[f"{node.name}.running_var"]}
        self.backend.run(_Kinds.batchnorm_eval(node.kind), node.all_sizes(len(arrays["x"])),
                         {**arrays, **given})

    def backward(self, ws: Workspace) -> None:
        """Fill ``grads`` with ∂(mean loss)/∂(parameter) for the last forward on ``ws``."""
        if not ws.train:
            raise VggenError("backward needs a training-mode forward pass")
        be = self.backend
        for k in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[k]
            skip = ("g_x",) if k == 0 else ()
            be.run(node.backward, node.all_sizes(ws.batch), ws.backward[k], skip=skip)

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
           "FUSE_BY_DEFAULT",
           "init_parameters", "ARCHITECTURE", "BN_EPS", "BN_MOMENTUM"]
