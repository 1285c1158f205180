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
``layer FILE.py:FUNCTION  a layer of the user's own, written as equations
[NAME=VALUE ...]``        (below)
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

**A layer of one's own.**  ``layer FILE.py:FUNCTION [NAME=VALUE ...]`` runs a
layer that vggen does not ship, with no change to vggen:

* ``FILE`` is relative to the model file's directory (or absolute); it is
  Python and is *executed* (once per content, through importlib, on its own:
  its directory is not put on ``sys.path``).  ``FUNCTION``, a callable in it,
  returns a :class:`vggen.frontend.lang.Layer`.
* Each ``NAME=VALUE`` (an int, else a float) is passed to ``FUNCTION`` as a
  keyword argument if it takes one of that name, and fixed at compile time
  (``vggen.compile(layer, target, sizes=...)``) if the layer has a size or
  constant of that name: a size the shapes cannot tell, such as a stride.
  A name that is neither is a mistake.
* The layer reads the previous node's output as its one ``Role.INPUT``
  tensor (any name; a parameter is ``Role.PARAMETER``), shaped ``(B, C, H,
  W)`` or, flattened, ``(B, features)``; it writes one ``Role.OUTPUT``
  tensor of either rank, which the next entry reads.  ``B``, the batch, is
  the first dimension of both (any size symbol).  Every other size is read
  from the incoming activations' shape (``vggen.ops.infer_sizes``) or fixed
  on the line; the output's shape follows from them.
* Its ``Role.PARAMETER`` tensors are trained like every other parameter
  (keyed ``<node>.<tensor>``, the node named after ``FUNCTION``: ``swish1``).
  They start from ``initialise_<FUNCTION>(shapes, rng)`` if the file defines
  it (``shapes``: tensor name -> shape; it returns tensor name -> array),
  else from the default of :func:`vggen.model.kinds.default_initialisation`.
* Its forward and derived backward kernels are those of ``vggen.compile``
  for the network's target (its op cache); fusion leaves it alone.

A missing file or function, a function that raises or returns no Layer, a
layer without exactly one input and one output, and sizes that do not fit
the activations are each one :class:`VggenError` naming the model file and
line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sympy as sp

from vggen.errors import VggenError
from vggen.frontend.lang import Layer, Role

# kind -> what its argument is: None (no argument), "multiple" (a positive
# integer times C1, or "classes" for linear), "ratio" (0 ≤ P < 1), "user"
# (FILE.py:FUNCTION [NAME=VALUE ...]: a UserLayer)
ENTRIES = {"block": "multiple", "conv": "multiple", "bn": None, "relu": None,
           "dropout": "ratio", "pool": None, "linear": "multiple", "loss": None, "layer": "user"}

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
    entries: tuple       # (kind, argument) per entry; a `layer` entry's argument is a UserLayer

    @property
    def poolings(self) -> int:
        return sum(kind == "pool" for kind, _ in self.entries)

    @property
    def layer_files(self) -> dict[str, str]:
        """The layer file of every ``layer`` entry, as the model file names it
        (relative to it: the pair moves together) -> the SHA-256 of its bytes."""
        return {arg.file: arg.sha256 for kind, arg in self.entries if kind == "layer"}


# --------------------------------------------------------------------------- a user's layer


@dataclass(frozen=True, eq=False)
class UserLayer:
    """A ``layer FILE.py:FUNCTION [NAME=VALUE ...]`` entry: its file loaded, its layer checked."""

    file: str                     # FILE as the model file names it
    path: Path                    # the layer file, absolute
    function: str                 # FUNCTION
    arguments: dict               # every NAME=VALUE of the line (int or float)
    sizes: dict                   # those naming a size or constant of the layer: fixed at compile time
    layer: Layer                  # what FUNCTION returned
    input: str                    # its one non-parameter INPUT: the previous node's output
    output: str                   # its one OUTPUT: what the next node reads
    batch: str                    # the batch size's name: the first dimension of both
    parameters: tuple             # its PARAMETER tensors, trained
    initialise: Callable | None   # initialise_<FUNCTION>(shapes, rng) -> arrays, if the file has it
    sha256: str                   # of the layer file's bytes
    where: str                    # "<model file>, line N": later errors (sizes, compile) name it

    def __str__(self) -> str:
        return f"{self.path.name}:{self.function}"


# (absolute path, SHA-256 of its bytes) -> the executed module: a layer file
# runs once per content, however often its model is loaded (train validates
# the model, then builds it); an edited file is executed afresh.
_MODULES: dict = {}


def exception_line(e: BaseException, path: Path) -> str:
    """``e`` as one line, with the line of the layer file it was raised at."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({path.name}, line {e.lineno})"
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == str(path):
            line = frame.lineno
    message = " ".join(str(e).split())
    at = f" ({path.name}, line {line})" if line is not None else ""
    return f"{type(e).__name__}{': ' + message if message else ''}{at}"


def _execute(path: Path, digest: str, where: str):
    key = (str(path), digest)
    module = _MODULES.get(key)
    if module is not None:
        return module
    name = f"vggen_user_layer_{digest[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise VggenError(f"{where}: cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # dataclasses and pickle look a class's module up there
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise VggenError(f"{where}: loading {path.name} raised {exception_line(e, path)}") from None
    _MODULES[key] = module
    return module


def _number(word: str, where: str):
    try:
        return int(word)
    except ValueError:
        pass
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise VggenError(f"{where}: {word!r} is not a number (NAME=VALUE takes an int or a float)")
    return value


def _name_values(words: list[str], where: str) -> dict:
    out: dict = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not eq or not name.isidentifier() or not value:
            raise VggenError(f"{where}: {word!r} is not NAME=VALUE")
        if name in out:
            raise VggenError(f"{where}: {name} is given twice")
        out[name] = _number(value, where)
    return out


def _keywords(function) -> set | None:
    """The keyword arguments ``function`` takes (None: any, it has ``**kwargs``)."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):       # a builtin without a signature
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _fixed_sizes(layer: Layer, arguments: dict, takes: set | None, batch: str, what: str) -> dict:
    """The NAME=VALUEs that name a size or constant of ``layer``, checked."""
    constants = {s.name for s in layer.constants}
    size_names = {s.name for s in layer.size_symbols} - constants
    fixed = {}
    for name, value in arguments.items():
        if name == batch:
            raise VggenError(f"{what}: {name} is the batch size: --batch-size sets it")
        if name in size_names:
            if not (isinstance(value, int) and value >= 1):
                raise VggenError(f"{what}: size {name} must be a positive integer, got {value!r}")
            fixed[name] = value
        elif name in constants:
            fixed[name] = value
        elif takes is not None and name not in takes:
            known = ", ".join(sorted(size_names | constants)) or "none"
            raise VggenError(f"{what}: {name} is neither a keyword of the function nor a size or "
                             f"constant of the layer (its sizes and constants: {known})")
    return fixed


def _check_layer(layer: Layer, what: str) -> tuple[str, str, str, tuple]:
    """(input, output, batch name, parameters) of a user's layer, or a one-line mistake."""
    if layer.direction != "forward":
        raise VggenError(f"{what}: it is a derived program; return the forward layer")
    inputs = layer.role(Role.INPUT)
    if len(inputs) != 1:
        found = f"{len(inputs)} ({', '.join(t.name for t in inputs)})" if inputs else "none"
        raise VggenError(f"{what}: a layer in a model reads exactly one Role.INPUT tensor, the "
                         f"previous node's output (parameters are Role.PARAMETER); it has {found}")
    outputs = layer.outputs
    if len(outputs) != 1:
        found = f"{len(outputs)} ({', '.join(t.name for t in outputs)})" if outputs else "none"
        raise VggenError(f"{what}: a layer in a model writes exactly one Role.OUTPUT tensor, "
                         f"which the next node reads; it has {found}")
    if layer.role(Role.STATE):
        raise VggenError(f"{what}: a layer in a model cannot update state in place "
                         f"({', '.join(t.name for t in layer.role(Role.STATE))})")
    x, y = inputs[0], outputs[0]
    if x.dtype != "float" or not x.differentiable:
        raise VggenError(f"{what}: its input {x.name} must be a differentiable float tensor: "
                         f"the gradient flows back through it")
    for t in (x, y):
        if t.rank not in (2, 4):
            raise VggenError(f"{what}: {t.name} has rank {t.rank}; a model's activations are "
                             f"(B, C, H, W) or (B, features)")
    batch = x.shape[0]
    if not isinstance(batch, sp.Symbol) or y.shape[0] != batch:
        raise VggenError(f"{what}: the first dimension of {x.name} and {y.name} must be the batch, "
                         f"one size symbol (got {x.shape[0]} and {y.shape[0]})")
    parameters = layer.role(Role.PARAMETER)
    for p in parameters:
        if p.dtype != "float" or not p.differentiable:
            raise VggenError(f"{what}: parameter {p.name} must be a differentiable float tensor "
                             f"to be trained")
        if any(batch in d.free_symbols for d in p.shape):
            raise VggenError(f"{what}: parameter {p.name}'s shape {p.shape} depends on the batch {batch}")
    return x.name, y.name, batch.name, tuple(p.name for p in parameters)


def load_user_layer(words: list[str], where: str, directory: Path) -> UserLayer:
    """The ``layer`` entry of ``words`` (after the entry's name), its file
    relative to ``directory``; every mistake is one VggenError naming ``where``."""
    usage = "layer takes FILE.py:FUNCTION [NAME=VALUE ...]"
    if not words:
        raise VggenError(f"{where}: {usage}")
    file, colon, function = words[0].rpartition(":")
    if not (colon and file and function.isidentifier()):
        raise VggenError(f"{where}: {usage}, got {words[0]!r}")
    if not file.endswith(".py"):
        raise VggenError(f"{where}: the layer file {file!r} must be Python (FILE.py)")
    arguments = _name_values(words[1:], where)
    path = Path(file) if Path(file).is_absolute() else directory / file
    path = Path(path.absolute())
    if not path.is_file():
        raise VggenError(f"{where}: no layer file {file} (looked for {path})")
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise VggenError(f"{where}: cannot read {path} ({e.strerror or e})") from None
    module = _execute(path, digest, where)
    fn = getattr(module, function, None)
    if not callable(fn):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v)
                         and v.__module__ == module.__name__ and not n.startswith("_"))
        also = f" (it defines {', '.join(defined)})" if defined else ""
        raise VggenError(f"{where}: {file} has no function {function!r}{also}")
    takes = _keywords(fn)
    try:
        layer = fn(**{k: v for k, v in arguments.items() if takes is None or k in takes})
    except Exception as e:
        raise VggenError(f"{where}: {function}() of {file} raised {exception_line(e, path)}") from None
    if not isinstance(layer, Layer):
        raise VggenError(f"{where}: {function}() of {file} returned {type(layer).__name__}, "
                         f"not a vggen.frontend.lang.Layer")
    what = f"{where}: layer {layer.name} ({file}:{function})"
    x, y, batch, parameters = _check_layer(layer, what)
    fixed = _fixed_sizes(layer, arguments, takes, batch, what)
    initialise = getattr(module, f"initialise_{function}", None)
    if initialise is not None and not callable(initialise):
        raise VggenError(f"{where}: initialise_{function} in {file} is not a function")
    return UserLayer(file, path, function, arguments, fixed, layer, x, y, batch, parameters,
                     initialise, digest, where)


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


def parse_model(text: str, source: str, directory: str | Path | None = None) -> Model:
    """The model of ``text`` (read from ``source``); a ``layer`` entry's file is
    relative to ``directory`` (default: ``source``'s directory)."""
    directory = Path(source).parent if directory is None else Path(directory)
    entries, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        kind = words[0].lower()
        if kind not in ENTRIES:
            raise VggenError(f"{source}, line {n}: unknown entry {words[0]!r}: "
                             f"choose one of {', '.join(ENTRIES)}")
        where = f"{source}, line {n}"
        if ENTRIES[kind] == "user":
            entries.append((kind, load_user_layer(words[1:], where, directory)))
        else:
            entries.append((kind, _argument(kind, words[1:], where)))
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


__all__ = ["MODELS", "DEFAULT", "ENTRIES", "Model", "UserLayer", "load_model", "load_user_layer",
           "parse_model", "check_entries"]
