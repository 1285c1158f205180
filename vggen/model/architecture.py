"""Networks as data: a model is a list of entries, shipped by name or read from a file.

An entry is ``(kind, argument)``:

========================  ==================================================
``block M``               Convolution2D 3×3 to ``M``·C1 channels → BatchNormalization → ReLU
``conv M``                Convolution2D 3×3 to ``M``·C1 channels alone
``bn``, ``relu``          BatchNormalization, ReLU on what is there
``dropout P``             Dropout with ratio ``P`` (0 ≤ P < 1); left out by ``--no-dropout``
``pool``                  2×2 max pooling, stride 2
``linear M``              Linear (no bias) to ``M``·C1 features, or ``linear classes``
``loss``                  SoftmaxCrossEntropy: the last entry, and only there
========================  ==================================================

C1 is ``--width``.  The shipped models (:data:`MODELS`): ``vgg``, the
network of ``shared/vgg-network.md`` (the default: VGG-16's convolutions with
dropout between them); ``vgg11``, ``vgg13``, ``vgg16`` and ``vgg19``,
configurations A, B, D and E of Simonyan & Zisserman with BatchNormalization,
no dropout between convolutions, and the same classifier head as ``vgg``.

A model file holds one entry per line, ``#`` starting a comment::

    # a small VGG for 32×32 images
    block 1
    pool
    block 2
    pool
    linear 4
    relu
    linear classes
    loss

:func:`load_model` takes a shipped name or a file path; every mistake is one
:class:`VggenError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vggen.errors import VggenError

# kind -> what its argument is: None (no argument), "multiple" (a positive
# integer times C1, or "classes" for linear), "ratio" (0 ≤ P < 1)
ENTRIES = {"block": "multiple", "conv": "multiple", "bn": None, "relu": None,
           "dropout": "ratio", "pool": None, "linear": "multiple", "loss": None}

_HEAD = (("dropout", 0.5), ("linear", 8), ("bn", None), ("relu", None), ("dropout", 0.5),
         ("linear", "classes"), ("loss", None))


def _vgg(stages: tuple[int, ...], dropout_between: float | None = None) -> tuple:
    """Five stages of ``stages[s]`` blocks of 1, 2, 4, 8, 8 × C1 channels, each
    ending in a pooling, then the classifier head."""
    entries: list = []
    for blocks, multiple in zip(stages, (1, 2, 4, 8, 8)):
        for k in range(blocks):
            if k and dropout_between is not None:
                entries.append(("dropout", 0.3 if multiple == 1 else 0.4))
            entries.append(("block", multiple))
        entries.append(("pool", None))
    return tuple(entries) + _HEAD


MODELS: dict[str, tuple] = {
    "vgg": _vgg((2, 2, 3, 3, 3), dropout_between=0.4),
    "vgg11": _vgg((1, 1, 2, 2, 2)),
    "vgg13": _vgg((2, 2, 2, 2, 2)),
    "vgg16": _vgg((2, 2, 3, 3, 3)),
    "vgg19": _vgg((2, 2, 4, 4, 4)),
}
DEFAULT = "vgg"


@dataclass(frozen=True)
class Model:
    name: str            # a shipped name, or the file it was read from
    entries: tuple       # (kind, argument) per entry

    @property
    def poolings(self) -> int:
        return sum(kind == "pool" for kind, _ in self.entries)


def _argument(kind: str, words: list[str], where: str):
    what = ENTRIES[kind]
    if what is None:
        if words:
            raise VggenError(f"{where}: {kind} takes no argument, got {' '.join(words)!r}")
        return None
    if len(words) != 1:
        raise VggenError(f"{where}: {kind} takes one argument "
                         f"({'a ratio 0 ≤ P < 1' if what == 'ratio' else 'a multiple of --width'})")
    word = words[0]
    if what == "ratio":
        try:
            ratio = float(word)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio < 1.0:
            raise VggenError(f"{where}: the dropout ratio must be a number 0 ≤ P < 1, got {word!r}")
        return ratio
    if kind == "linear" and word == "classes":
        return "classes"
    if not (word.isdigit() and int(word) > 0):
        raise VggenError(f"{where}: {kind} needs a positive whole multiple of --width"
                         f"{' (or classes)' if kind == 'linear' else ''}, got {word!r}")
    return int(word)


def check_entries(entries, source: str, lines: list[int] | None = None) -> tuple:
    """``entries`` checked as a whole: one loss, last; a classifier before it."""
    where = (lambda k: f"{source}, line {lines[k]}") if lines else (lambda k: f"{source}, entry {k + 1}")
    if not entries or entries[-1][0] != "loss":
        raise VggenError(f"{source}: a model ends with `loss` (SoftmaxCrossEntropy)")
    for k, (kind, _) in enumerate(entries[:-1]):
        if kind == "loss":
            raise VggenError(f"{where(k)}: `loss` must be the last entry")
    if not any(kind == "linear" and arg == "classes" for kind, arg in entries):
        raise VggenError(f"{source}: no `linear classes`: the loss needs one score per class")
    return tuple(entries)


def parse_model(text: str, source: str) -> Model:
    entries, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        kind = words[0].lower()
        if kind not in ENTRIES:
            raise VggenError(f"{source}, line {n}: unknown entry {words[0]!r}: "
                             f"choose one of {', '.join(ENTRIES)}")
        entries.append((kind, _argument(kind, words[1:], f"{source}, line {n}")))
        lines.append(n)
    return Model(source, check_entries(entries, source, lines))


def load_model(name_or_path: str) -> Model:
    """A shipped model by name, else the model file at that path."""
    if name_or_path in MODELS:
        return Model(name_or_path, MODELS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise VggenError(f"--model {name_or_path}: neither a shipped model "
                         f"({', '.join(MODELS)}) nor a model file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VggenError(f"--model {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    return parse_model(text, str(path))


__all__ = ["MODELS", "DEFAULT", "ENTRIES", "Model", "load_model", "parse_model", "check_entries"]
