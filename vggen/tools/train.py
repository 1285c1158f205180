"""Training the generated VGG: SGD with momentum and weight decay.

``train(TrainConfig(...))`` runs the epochs and returns one metrics dict per
epoch it ran.  The pieces:

* **Optimizer** — SGD with momentum and L2 weight decay, in the form PyTorch
  uses: ``v ← μ·v + ∂L/∂p + λ·p``, ``p ← p − η·v`` (applied to every
  parameter, BatchNormalization's γ and β included), written as equations
  and generated like the layers (:mod:`vggen.model.optim`): one kernel over the
  network's flat parameter vector per step.  ``momentum=0, weight_decay=0``
  is the reference's plain ``p ← p − η·∂L/∂p``.
* **Learning-rate schedule** — cosine annealing per step, from ``lr`` at the
  first step to 0 after the last: ``η_t = lr · ½ (1 + cos(π t / T))``, with T
  the steps of ``schedule_epochs`` epochs (default: ``epochs``).  It depends
  only on the step index and T, so a resumed run follows the same curve.
* **Data** — mini-batches drawn in a fresh random order each epoch, the
  incomplete last batch dropped (every step has the same batch size);
  augmentation (unless ``augment=False``) is a random crop from the image
  zero-padded by 4 pixels, plus a random horizontal flip for cifar10 only
  (a mirrored digit is another symbol).  The test split is evaluated after
  every epoch in evaluation mode (BN running statistics, no dropout).
* **Randomness** — parameters are initialised from ``seed``; shuffling,
  augmentation and dropout masks come from one generator seeded with
  ``(seed, 1)`` whose state is saved in every checkpoint, so ``resume``
  continues exactly where the uninterrupted run would be.
* **Checkpoints** — ``<checkpoint>/checkpoint.npz`` after every epoch
  (:mod:`vggen.model.checkpoint`: parameters, velocities, BN statistics, config,
  epoch, generator state, metrics so far), replaced atomically.  A fresh run
  never overwrites an existing checkpoint.
* **Resume** (:func:`resumed_config`) — the checkpoint's configuration is the
  resumed run's: the options that define the trajectory (``RUN_DEFINING``)
  may be repeated but not changed; ``--epochs`` may extend the run within its
  schedule, and past it only with an explicit new ``--schedule-epochs``.  So a
  run resumed from epoch k and run to its end is the run that was never
  interrupted, to the last bit on the same target: ``--epochs 2
  --schedule-epochs 3`` then ``--epochs 3 --resume`` equals ``--epochs 3``.
  A resumed run writes its checkpoints where it resumed from unless
  ``--checkpoint`` says otherwise.
* **Precision** — ``precision="bf16"`` (the c target only) runs the
  convolutions' and Linear layers' products in bf16 with fp32 sums
  (:mod:`vggen.runtime.c`); parameters, gradients, velocities and every other
  kernel stay fp32.  It defines the run: a checkpoint records it and a
  resumed run keeps it.
* **Divergence** — a NaN or infinite loss (or test loss, or parameter) stops
  training with a VggenError before anything is saved, so the last good
  checkpoint stays whole.
* **Metrics** — a tqdm bar per epoch (loss, accuracy, images/s) where
  someone watches, else one logged line per epoch
  (:mod:`vggen.tools.progress`); with
  ``metrics`` set, one JSON line per epoch: ``epoch, train_loss, train_acc,
  test_loss, test_acc, images_per_s, seconds``, appended after the epoch's
  checkpoint, by one run at a time (:mod:`vggen.tools.metrics`).
* **Paths first** — the checkpoint directory and the metrics file are checked
  (and the metrics file locked) before the data, the kernels or the first
  step, so a path that cannot be written costs no training.
* **Several ranks** (``mpiexec -n N vggen train``, :mod:`vggen.distributed`)
  and **gradient accumulation** (``accumulate`` K) — a step reads a global
  batch of N·K·``batch_size`` images, the next slice of the epoch's order,
  cut into N·K micro-batches; rank r trains on micro-batches r·K … r·K+K−1
  with its own BatchNormalization batch statistics, and the gradients are
  averaged over all micro-batches (:mod:`vggen.distributed.gradients`).  Each
  rank draws from the one generator what one process would for the whole
  global batch (:mod:`vggen.distributed.shard`), so N ranks and one process
  with ``accumulate`` N read the same data.  Before any step the ranks compare
  their configurations and kernels; every ``check_every`` steps and after
  every epoch, their parameters.  Evaluation is shared round-robin by batch.
  Rank 0 alone reads the checkpoint it resumes from (the others receive it),
  writes checkpoints and metrics, and shows progress; a checkpoint records
  the number of ranks, and a resumed run keeps it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Collection

import numpy as np
from tqdm import tqdm

from vggen import __version__
from vggen.atomic import check_directory
from vggen.data.augment import draw_crops
from vggen.data.datasets import DATASETS, load_dataset
from vggen.distributed.checks import check_identical, check_same_kernels, check_same_run
from vggen.distributed.comm import Comm, SingleComm
from vggen.distributed.failure import CollectiveError, agree
from vggen.distributed.launch import select_device
from vggen.distributed.nccl import NcclComm, nccl_module
from vggen.distributed.shard import Split, dropout_generators, my_micro_batches, my_test_batches
from vggen.errors import VggenError
from vggen.model import checkpoint as ckpt
from vggen.model.architecture import MODELS, load_model
from vggen.model.network import Network, NonFiniteLoss
from vggen.model.optim import SGD
from vggen.model.step import TrainStep
from vggen.runtime import PRECISIONS, TARGETS, get_backend, resolve_target
from vggen.tools.metrics import MetricsLog
from vggen.tools.progress import progress_bars_enabled

SCHEDULE = "cosine"
log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    target: str = "auto"            # auto, c, cuda, numpy
    dataset: str = "digits"         # digits, cifar10
    data: str | None = None         # CIFAR-10 directory (None: $VGGEN_DATA or the cache)
    epochs: int = 10
    schedule_epochs: int | None = None  # the cosine schedule's length in epochs (None: epochs)
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 64                 # C1
    model: str = "vgg"              # a shipped model (vggen.model.architecture.MODELS) or a model file
    seed: int = 0
    metrics: str | None = None      # JSON-lines file
    checkpoint: str | None = None   # directory
    resume: str | None = None       # checkpoint file (or directory holding checkpoint.npz)
    dropout: bool | None = None     # None: the network's ratios on cifar10, off on digits
    augment: bool = True
    fuse: bool | None = None        # BN → ReLU (→ dropout) as one layer; None: the target's default
    cuda_graph: bool = False        # cuda: replay each step as captured CUDA graphs (vggen.model.step)
    progress: bool = True           # tqdm bars where stderr is a terminal (the CLI leaves it on)
    allow_modified_kernels: bool = False  # run generated sources that differ from the manifest
    accumulate: int = 1             # micro-batches of batch_size per rank and step (gradients added)
    check_every: int = 100          # several ranks: compare the ranks' parameters every N steps
    sync_bn: bool = False           # several ranks: BatchNormalization over the global batch (vggen.distributed.syncbn)
    precision: str = "fp32"         # c: "bf16" multiplies the contractions' operands in bf16 (vggen.runtime.c)
    conv_algorithm: str = "auto"    # how 3×3 convolutions run (vggen.runtime.algorithms): auto, direct, winograd2/4


# The options that define a run's trajectory: a resumed run keeps the checkpoint's.
RUN_DEFINING = ("model", "dataset", "width", "seed", "batch_size", "lr", "momentum", "weight_decay",
                "augment", "dropout", "accumulate", "sync_bn", "precision")
# ...and those a resumed run takes from the checkpoint unless the command line names them.
CARRIED = RUN_DEFINING + ("epochs", "schedule_epochs", "metrics", "data")


# --------------------------------------------------------------------------- pieces


def learning_rate(base: float, step: int, total: int) -> float:
    """Cosine annealing from ``base`` at step 0 to 0 after ``total`` steps."""
    if total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * step / total))


def validate(config: TrainConfig) -> None:
    """Reject a bad config with a VggenError naming the option."""
    def integer(name, low):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise VggenError(f"--{name.replace('_', '-')} must be an integer ≥ {low}, got {v!r}")

    integer("epochs", 0)
    integer("batch_size", 1)
    integer("accumulate", 1)
    integer("check_every", 1)
    integer("width", 1)
    integer("seed", 0)
    if config.schedule_epochs is not None:
        integer("schedule_epochs", 1)
        if config.schedule_epochs < config.epochs:
            raise VggenError(f"--schedule-epochs {config.schedule_epochs} is shorter than --epochs "
                             f"{config.epochs}: the learning rate would reach 0 before the end")
    load_model(config.model)
    if config.cuda_graph and config.accumulate > 1:
        raise VggenError("--cuda-graph with --accumulate is not supported yet: leave out --cuda-graph")
    if config.target not in TARGETS:
        raise VggenError(f"unknown target {config.target!r}: choose one of {', '.join(TARGETS)}")
    if config.precision not in PRECISIONS:
        raise VggenError(f"unknown precision {config.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if config.precision != "fp32" and config.target not in ("auto", "c"):
        raise VggenError(f"--precision {config.precision} is for the c target only, not {config.target}")
    if config.dataset not in DATASETS:
        raise VggenError(f"unknown dataset {config.dataset!r}: choose one of {', '.join(DATASETS)}")
    if not (math.isfinite(config.lr) and config.lr >= 0):
        raise VggenError(f"--lr must be a finite number ≥ 0, got {config.lr}")
    if not (0 <= config.momentum < 1):
        raise VggenError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise VggenError(f"--weight-decay must be a finite number ≥ 0, got {config.weight_decay}")


def given_options(config: TrainConfig) -> set[str]:
    """The fields of ``config`` that differ from the defaults: what a caller of the
    Python API asked for (the command line knows exactly which options were typed)."""
    default = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(default, f.name)}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_option(key: str, value) -> str:
    """How the command line says that ``key`` is ``value``."""
    if key == "augment":
        return "augmentation" if value else "--no-augment"
    if key == "dropout":
        return {True: "--dropout", False: "--no-dropout"}.get(value, "the dataset's default dropout")
    return f"{_option(key)} {value}"


def resumed_config(config: TrainConfig, saved: dict, given: Collection[str], path) -> TrainConfig:
    """The configuration of a run resumed from a checkpoint whose config is ``saved``.

    ``given`` names the options the user set.  See the module docstring."""
    # checkpoints from before --accumulate, --sync-bn and --precision: one micro-batch,
    # per-rank statistics, fp32
    saved = {"accumulate": 1, "sync_bn": False, "precision": "fp32", **saved}
    carried = {k: saved[k] for k in CARRIED if k in saved and k not in given}
    merged = replace(config, **carried)
    for key in RUN_DEFINING:
        if key not in saved or key not in given:
            continue
        mine, theirs = getattr(config, key), saved[key]
        if key == "model":             # a file is the same model by any path
            mine, theirs = _model_id(mine), _model_id(theirs)
        if key == "dropout":           # compare what runs: None means the dataset's default
            mine = use_dropout(merged)
            theirs = use_dropout(replace(merged, dropout=theirs))
        if mine != theirs:
            raise VggenError(f"checkpoint {path} was trained with {_as_option(key, saved[key])}; "
                             f"a resumed run keeps it (got {_as_option(key, getattr(config, key))}): "
                             f"repeat it, or start a new run")
    if "schedule_epochs" not in given:
        schedule = saved.get("schedule_epochs") or saved.get("epochs") or merged.epochs
        if merged.epochs > schedule:
            raise VggenError(f"--epochs {merged.epochs} goes past the learning-rate schedule of "
                             f"{path} (cosine to 0 over {schedule} epochs): pass --schedule-epochs N "
                             f"(N ≥ {merged.epochs}) for a new schedule; a run meant to be extended "
                             f"starts with --schedule-epochs")
        merged = replace(merged, schedule_epochs=schedule)
    if merged.checkpoint is None:      # keep checkpointing where the run resumed from
        resumed = Path(path)
        merged = replace(merged, checkpoint=str(resumed if resumed.is_dir() else resumed.parent))
    return merged


def _model_id(model: str) -> str:
    return model if model in MODELS else os.path.abspath(model)


def _checkpoint_path(config: TrainConfig, resumed_from: str | None) -> Path | None:
    """The checkpoint file this run writes, checked before any work: a directory
    that can be written, and no other run's checkpoint to overwrite."""
    if not config.checkpoint:
        return None
    path = check_directory(config.checkpoint, "--checkpoint ") / ckpt.FILENAME
    if path.exists():
        source = Path(resumed_from) if resumed_from else None
        if source is not None and source.is_dir():
            source = source / ckpt.FILENAME
        if source is None or not (source.exists() and os.path.samefile(source, path)):
            raise VggenError(f"--checkpoint {config.checkpoint} already holds a checkpoint of "
                             f"another run ({path}): resume it with --resume {config.checkpoint}, "
                             f"or name another directory")
    return path


def _saved_config(config: TrainConfig) -> dict:
    """The config a checkpoint records: paths made absolute, so a resume from
    another directory finds the same files."""
    saved = asdict(config)
    for key in ("metrics", "checkpoint", "data"):
        if saved[key]:
            saved[key] = os.path.abspath(saved[key])
    saved["model"] = _model_id(config.model)
    return saved


def _finite_params(net: Network) -> bool:
    xp = net.backend.xp
    return all(bool(xp.isfinite(p).all()) for p in net.params.values())


# --------------------------------------------------------------------------- training


def use_dropout(config: TrainConfig) -> bool:
    """Dropout unless switched off; by default on for CIFAR-10 only.

    The network's ratios (0.3–0.5 in 13 places) are meant for CIFAR-10's
    50,000 images and hundreds of epochs: on the 1,437 training digits they
    keep a 10-epoch run near chance (measured: 10–25% test accuracy, the same
    in an independent PyTorch replica), so the offline default trains without.
    """
    return config.dataset == "cifar10" if config.dropout is None else config.dropout


def train(config: TrainConfig, given: Collection[str] | None = None,
          comm: Comm | None = None) -> list[dict]:
    """Train as ``config`` says; returns the metrics of each epoch run (see module doc).

    ``given`` names the options the user set (default: those that differ from
    the defaults); it matters only for a resumed run.  ``comm``: this process's
    rank of a data-parallel run (default: the only one)."""
    comm = SingleComm() if comm is None else comm
    given = given_options(config) if given is None else set(given)
    check_same_run(comm, config)
    agree(comm, lambda: validate(config))
    # rank 0 alone reads the checkpoint and opens the files it writes; the others get its result
    prepared = agree(comm, (lambda: _prepare(config, given, comm)) if comm.rank == 0 else (lambda: None))
    if comm.size > 1:
        shared = comm.broadcast_object(prepared[:3] if comm.rank == 0 else None)
        prepared = prepared if comm.rank == 0 else (*shared, None, None)
    config, resume, start, ck_path, metrics = prepared
    if start >= config.epochs:
        log.info(f"nothing to do: {config.resume} has {start} epochs, {config.epochs} requested"
                 if resume is not None else "nothing to do: 0 epochs requested")
        return []
    try:
        return _train(config, resume, start, ck_path, metrics, comm)
    finally:
        if metrics is not None:
            metrics.close()


def _prepare(config: TrainConfig, given: set[str], comm: Comm) -> tuple:
    """(config, checkpoint or None, first epoch, checkpoint path, metrics log): the
    resumed run's configuration, and the files this run writes, checked and opened."""
    resume = ckpt.load(config.resume) if config.resume else None
    if resume is not None:
        config = resumed_config(config, resume.header["config"], given, config.resume)
        validate(config)
        ckpt.check_layer_files(f"checkpoint {config.resume}", resume.header,
                               load_model(config.model).layer_files)
        _check_ranks(resume.header, config.resume, comm)
        start = resume.epoch
    else:
        start = 0
    if start >= config.epochs:
        return config, resume, start, None, None
    ck_path = _checkpoint_path(config, config.resume)
    metrics = MetricsLog(config.metrics) if config.metrics else None
    if metrics is not None:
        if resume is None:
            metrics.start_fresh()
        else:
            metrics.start_resumed(list(resume.header.get("history", [])), config.resume)
    return config, resume, start, ck_path, metrics


def _check_ranks(header: dict, path, comm: Comm) -> None:
    """A run resumes on as many ranks as it was trained on (a checkpoint without
    the field was written by one process)."""
    ranks = header.get("ranks", 1)
    if type(ranks) is not int or ranks < 1:
        raise VggenError(f"checkpoint {path}: header field 'ranks' must be an integer ≥ 1, not {ranks!r}")
    if ranks != comm.size:
        how = "as one process" if ranks == 1 else f"with mpiexec -n {ranks}"
        raise VggenError(f"checkpoint {path} was trained on {ranks} rank{'s' if ranks > 1 else ''}; a "
                         f"resumed run keeps them (this one has {comm.size}): run it {how}")


def _setup_backend(target: str, config: TrainConfig, comm: Comm):
    if target == "cuda" and comm.size > 1:
        select_device(comm)
    backend = get_backend(target, allow_modified_kernels=config.allow_modified_kernels,
                          precision=config.precision)
    backend.conv_algorithm = config.conv_algorithm
    return backend


def _load_data(config: TrainConfig, split: Split):
    train_set, test_set = load_dataset(config.dataset, config.data, config.seed)
    if split.global_batch > len(train_set):
        if split.micro_batches == 1:
            raise VggenError(f"--batch-size {config.batch_size} is larger than the training set "
                             f"({len(train_set)} images of {config.dataset})")
        raise VggenError(f"the global batch, {split.ranks} rank{'s' if split.ranks > 1 else ''} × "
                         f"--accumulate {split.accumulate} × --batch-size {split.batch} = "
                         f"{split.global_batch} images, is larger than the training set "
                         f"({len(train_set)} images of {config.dataset})")
    return train_set, test_set


def _train(config: TrainConfig, resume, start: int, ck_path: Path | None,
           metrics: MetricsLog | None, comm: Comm) -> list[dict]:
    target = agree(comm, lambda: resolve_target(config.target))
    backend = agree(comm, lambda: _setup_backend(target, config, comm))
    check_same_kernels(comm, backend)
    gradient_comm = comm
    if target == "cuda" and comm.size > 1:
        gradient_comm = NcclComm(comm, agree(comm, nccl_module))
    split = Split(comm.rank, comm.size, config.accumulate, config.batch_size)
    train_set, test_set = agree(comm, lambda: _load_data(config, split))

    dropout = use_dropout(config)

    def build():
        net = Network(backend, width=config.width, classes=train_set.classes,
                      dropout=dropout, seed=config.seed,
                      image_shape=train_set.images.shape[1:], fuse=config.fuse, model=config.model)
        opt = SGD(net.params, net.grads, backend, config.momentum, config.weight_decay,
                  flat=(net.flat_params, net.flat_grads))
        step = TrainStep(net, opt, graph=config.cuda_graph, comm=gradient_comm,
                         accumulate=config.accumulate, sync_bn=config.sync_bn)
        return net, opt, step

    net, opt, step = agree(comm, build)
    rng = np.random.default_rng((config.seed, 1))
    history: list[dict] = []
    if resume is not None:
        net.load(resume.params, resume.state)
        opt.load(resume.momentum)
        try:
            rng.bit_generator.state = resume.header["rng"]
        except (TypeError, ValueError, KeyError) as e:
            raise VggenError(f"checkpoint {config.resume}: bad generator state ({e})") from e
        history = list(resume.header.get("history", []))

    batch = split.global_batch
    steps = len(train_set) // batch
    total_steps = (config.schedule_epochs or config.epochs) * steps
    flip = config.dataset == "cifar10"

    note = (f"resuming after epoch {start} of {config.resume}; " if resume is not None else "")
    note += (f"training on {backend.name}: width {config.width}, {net.parameter_count():,} "
             f"parameters, {len(train_set)} training / {len(test_set)} test images, "
             f"{steps} steps of {batch} per epoch")
    if split.micro_batches > 1:
        note += (f" ({split.ranks} rank{'s' if split.ranks > 1 else ''} × {split.accumulate} "
                 f"micro-batch{'es' if split.accumulate > 1 else ''} of {config.batch_size})")
    log.info(note)
    bars = config.progress and progress_bars_enabled() and comm.rank == 0

    def last_good(epoch: int) -> str:
        return (f"; the last good checkpoint is {ck_path} (epoch {epoch})"
                if ck_path is not None and ck_path.exists() else "")

    results = []
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not bars, dynamic_ncols=True, leave=True)
        loss_sum, correct, seen = 0.0, 0, 0
        try:
            order = rng.permutation(len(train_set))        # the epoch's order, as data.augment.batches
            for k in range(steps):
                indices = order[k * batch:(k + 1) * batch]
                crops = draw_crops(batch, rng, pad=4, flip=flip) if config.augment else None
                generators = dropout_generators(rng, split) if dropout else None
                micro = my_micro_batches(train_set.images, train_set.labels, indices, crops,
                                         generators, split)
                try:
                    res = step.run(micro, learning_rate(config.lr, epoch * steps + k, total_steps))
                except NonFiniteLoss as e:            # every rank saw the same global loss
                    raise CollectiveError(f"training stopped at epoch {epoch + 1}, batch {k + 1}: "
                                          f"the loss is {e.value}{last_good(epoch)}") from None
                loss_sum += res.loss * res.batch
                correct += res.correct
                seen += res.batch
                if comm.size > 1 and (epoch * steps + k + 1) % config.check_every == 0:
                    check_identical(comm, net, opt, f"after step {epoch * steps + k + 1} "
                                                    f"(epoch {epoch + 1})")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
                bar.update(1)
            backend.synchronize()
            train_seconds = time.perf_counter() - t0
            # before evaluation and the checkpoint: only a state every rank holds is written
            check_identical(comm, net, opt, f"after epoch {epoch + 1}")

            per_batch = np.zeros((2, -(-len(test_set) // config.batch_size)))
            for i, part in my_test_batches(len(test_set), config.batch_size, comm.rank, comm.size):
                per_batch[:, i] = net.evaluate(test_set.images[part], test_set.labels[part])
            if comm.size > 1:                # one rank's sum per batch, the others' zeros
                per_batch = comm.allgather(per_batch).sum(axis=0)
            test_loss = 0.0
            for value in per_batch[0]:       # in batch order, as one process adds them
                test_loss += float(value)
            test_correct = int(per_batch[1].sum())
            test_loss /= len(test_set)
            if not math.isfinite(test_loss) or not _finite_params(net):
                raise CollectiveError(f"training stopped after epoch {epoch + 1}: the parameters are "
                                      f"no longer finite (test loss {test_loss}){last_good(epoch)}")
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "test_loss": test_loss,
                "test_acc": test_correct / len(test_set),
                "images_per_s": seen / train_seconds,
                "seconds": time.perf_counter() - t0,
            }
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['train_acc']:.3f}",
                            test_acc=f"{row['test_acc']:.3f}", img_s=f"{row['images_per_s']:.0f}")
        finally:
            bar.close()
        if not bars:
            log.info("epoch %d/%d: loss %.4f, accuracy %.3f, test loss %.4f, test accuracy %.3f, "
                     "%.0f images/s, %.1f s", row["epoch"], config.epochs, row["train_loss"],
                     row["train_acc"], row["test_loss"], row["test_acc"], row["images_per_s"],
                     row["seconds"])
        history.append(row)
        results.append(row)
        if ck_path is not None:             # rank 0's alone
            header = {"config": _saved_config(config), "epoch": epoch + 1, "target": target,
                      "rng": rng.bit_generator.state, "history": history,
                      "schedule": SCHEDULE, "vggen": __version__,
                      "layer_files": net.model.layer_files, "ranks": comm.size}
            ckpt.save(ck_path, header, net.host_params(), opt.host_state(), net.host_state())
        if metrics is not None:        # after the checkpoint: the file never runs ahead of it
            metrics.append(row)
    return results


__all__ = ["TrainConfig", "train", "SGD", "learning_rate", "validate", "resumed_config",
           "given_options", "RUN_DEFINING", "SCHEDULE"]
