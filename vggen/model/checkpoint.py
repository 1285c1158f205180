"""Training checkpoints: one ``.npz`` per save, written atomically.

A checkpoint holds the parameters (``param/<name>``), the optimizer state
(``momentum/<name>``, the SGD velocity), the BatchNormalization running
statistics (``state/<name>``) and a JSON header (``header``, UTF-8 bytes):
format version, the training config, the number of epochs completed, the
state of the random generator, the metrics of every epoch so far, and, for a
model with layers of the user's own, the SHA-256 of each layer file
(``layer_files``: a resumed run refuses one that has changed since,
:func:`check_layer_files`, as the same parameters in another layer would
continue another run without a word).  The
header is also written beside it as ``<name>.json`` for people to read;
:func:`load` trusts only the copy inside the ``.npz``, and refuses the
``.json`` copy with a pointer to the ``.npz``.

Writing goes to a temporary file in the same directory, is flushed to disk,
then renamed over the old file (``os.replace``), so a crash or an error at
any point leaves the previous checkpoint whole.

:func:`load` checks everything a resumed run would act on before training
starts: the header field by field (``format``, ``version``, ``epoch``, the
types of the known ``config`` keys, ``rng`` as a state numpy accepts,
``history``, ``schedule``, ``layer_files``), and every array — float,
finite, a momentum per parameter with its shape.  Each problem is one :class:`VggenError` naming the
file and the field or array: a damaged file is never half-loaded.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggen.atomic import write_atomic
from vggen.errors import VggenError

FORMAT = "vggen-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"
GROUPS = ("param", "momentum", "state")


@dataclass
class Checkpoint:
    header: dict
    params: dict[str, np.ndarray]
    momentum: dict[str, np.ndarray]
    state: dict[str, np.ndarray]

    @property
    def epoch(self) -> int:
        return int(self.header["epoch"])


def save(path: str | Path, header: dict, params: dict, momentum: dict, state: dict) -> Path:
    """Write a checkpoint to ``path`` (a file) atomically; returns the path."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, **header}
    text = json.dumps(header, indent=1, sort_keys=True)
    arrays = {"header": np.frombuffer(text.encode("utf-8"), np.uint8)}
    for prefix, group in (("param", params), ("momentum", momentum), ("state", state)):
        for k, v in group.items():
            arrays[f"{prefix}/{k}"] = np.ascontiguousarray(v)
    write_atomic(path, lambda f: np.savez(f, **arrays))
    write_atomic(path.with_suffix(".json"), text + "\n")
    return path


# --------------------------------------------------------------------------- header schema


def _integer(low: int):
    return f"an integer ≥ {low}", lambda v: type(v) is int and v >= low


_STRING = "a string", lambda v: isinstance(v, str)
_STRING_OR_NULL = "a string or null", lambda v: v is None or isinstance(v, str)
_NUMBER = "a finite number", lambda v: type(v) in (int, float) and math.isfinite(v)
_BOOL = "true or false", lambda v: isinstance(v, bool)
_BOOL_OR_NULL = "true, false or null", lambda v: v is None or isinstance(v, bool)

# The types of ``vggen.tools.train.TrainConfig``'s fields, as ``asdict`` saves
# them.  Kept here rather than imported: vggen.model must not import
# vggen.tools (which imports it).  Keys not listed are accepted unchecked, so
# a checkpoint from a newer vggen with more options still loads.
CONFIG_SCHEMA = {
    "target": _STRING, "model": _STRING, "dataset": _STRING, "data": _STRING_OR_NULL,
    "epochs": _integer(0), "schedule_epochs": ("an integer ≥ 1 or null",
                                               lambda v: v is None or (type(v) is int and v >= 1)),
    "batch_size": _integer(1), "width": _integer(1), "seed": _integer(0),
    "lr": _NUMBER, "momentum": _NUMBER, "weight_decay": _NUMBER,
    "metrics": _STRING_OR_NULL, "checkpoint": _STRING_OR_NULL, "resume": _STRING_OR_NULL,
    "dropout": _BOOL_OR_NULL, "augment": _BOOL, "fuse": _BOOL_OR_NULL,
    "cuda_graph": _BOOL, "progress": _BOOL, "allow_modified_kernels": _BOOL,
    "accumulate": _integer(1), "check_every": _integer(1), "sync_bn": _BOOL,
    "precision": ('"fp32" or "bf16"', lambda v: v in ("fp32", "bf16")),
}
OPTIONAL_STRINGS = ("schedule", "target", "vggen")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value) -> str:
    """A header value for an error line: its repr, cut short (it may be a whole dict)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _only_integers(value) -> bool:
    """Whether a generator state holds only integers, as numpy's own states do:
    numpy would truncate a float (1.5 → 1) without a word."""
    if isinstance(value, dict):
        return all(_only_integers(v) for v in value.values())
    if isinstance(value, list):
        return all(_only_integers(v) for v in value)
    return type(value) is int


def _check_rng(where: str, rng) -> None:
    if not (isinstance(rng, dict) and isinstance(rng.get("bit_generator"), str) and "state" in rng):
        raise VggenError(f"{where}: header field 'rng' must be an object with 'bit_generator' "
                         f"and 'state', not {_show(rng)}")
    name = rng["bit_generator"]
    kind = getattr(np.random, name, None)
    if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)
            and kind is not np.random.BitGenerator):
        raise VggenError(f"{where}: header field 'rng' names {name!r}, not a numpy bit generator")
    generator = kind()
    try:
        if not _only_integers({k: v for k, v in rng.items() if k != "bit_generator"}):
            raise ValueError("it holds a value that is not an integer")
        generator.state = rng
        if generator.state != rng:
            raise ValueError("numpy reads it back differently")
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        reason = f"no {e.args[0]!r}" if isinstance(e, KeyError) else e
        raise VggenError(f"{where}: header field 'rng' is not a valid {name} state ({reason})") from None


def _check_header(where: str, header) -> None:
    """Every header field a resumed run reads, one VggenError per problem."""
    if not isinstance(header, dict):
        raise VggenError(f"{where}: the header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT:
        found = f"header field 'format' is {_show(header['format'])}" if "format" in header \
            else "header has no 'format'"
        raise VggenError(f"{where} is not a vggen checkpoint ({found})")
    version = header.get("version")
    if type(version) is not int or version != VERSION:
        raise VggenError(f"{where} has format version {_show(version)} (header field 'version'); "
                         f"this vggen reads version {VERSION}")
    for key in ("epoch", "config", "rng"):
        if key not in header:
            raise VggenError(f"{where}: header has no {key!r}")
    epoch = header["epoch"]
    if type(epoch) is not int or epoch < 0:
        raise VggenError(f"{where}: header field 'epoch' must be an integer ≥ 0, not {_show(epoch)}")
    config = header["config"]
    if not isinstance(config, dict):
        raise VggenError(f"{where}: header field 'config' must be an object, not {_show(config)}")
    for key, (kind, fits) in CONFIG_SCHEMA.items():
        if key in config and not fits(config[key]):
            raise VggenError(f"{where}: header field 'config.{key}' must be {kind}, "
                             f"not {_show(config[key])}")
    _check_rng(where, header["rng"])
    history = header.get("history", [])
    if not isinstance(history, list):
        raise VggenError(f"{where}: header field 'history' must be a list, not {_show(history)}")
    for i, row in enumerate(history):
        if not isinstance(row, dict):
            raise VggenError(f"{where}: header field 'history' must hold objects (one per epoch); "
                             f"item {i} is {_show(row)}")
    for key in OPTIONAL_STRINGS:
        if key in header and not isinstance(header[key], str):
            raise VggenError(f"{where}: header field {key!r} must be a string, not {_show(header[key])}")
    ranks = header.get("ranks", 1)
    if type(ranks) is not int or ranks < 1:
        raise VggenError(f"{where}: header field 'ranks' must be an integer ≥ 1, not {_show(ranks)}")
    files = header.get("layer_files", {})
    if not (isinstance(files, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v)
                                            for v in files.values())):
        raise VggenError(f"{where}: header field 'layer_files' must map each layer file to the "
                         f"SHA-256 of its bytes (64 hex digits), not {_show(files)}")


def check_layer_files(where: str, header: dict, current: dict) -> None:
    """Refuse to resume when the model's layer files (``current``, file -> SHA-256,
    :attr:`vggen.model.architecture.Model.layer_files`) are not those the
    checkpoint was trained with (its header's ``layer_files``; a checkpoint
    without the field predates it and is not checked)."""
    if "layer_files" not in header:
        return
    saved = header["layer_files"]
    for file in sorted(saved.keys() | current.keys()):
        if file not in current:
            raise VggenError(f"{where} was trained with layer file {file}, which the model no "
                             f"longer names: restore the model file, or start a new run")
        if file not in saved:
            raise VggenError(f"{where} was trained without layer file {file}, which the model now "
                             f"names: restore the model file, or start a new run")
        if saved[file] != current[file]:
            raise VggenError(f"{where} was trained with another {file} (SHA-256 {saved[file][:12]}…, "
                             f"now {current[file][:12]}…): restore it, or start a new run")


# --------------------------------------------------------------------------- loading


def _parse_header(where: str, raw: np.ndarray) -> dict:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise VggenError(f"{where}: the header is not UTF-8 text "
                         f"(an array of {raw.dtype} with shape {raw.shape})")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise VggenError(f"{where}: the header is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise VggenError(f"{where}: the header is not JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno})") from None
    except ValueError:          # json's limit on the digits of an integer
        raise VggenError(f"{where}: the header holds a number too long to read") from None
    except RecursionError:
        raise VggenError(f"{where}: the header is nested too deeply to read") from None
    _check_header(where, header)
    return header


def _check_array(where: str, name: str, a: np.ndarray) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        raise VggenError(f"{where}: {name} has dtype {a.dtype}; parameters and statistics are float")
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise VggenError(f"{where}: {name} has {bad} non-finite value{'s' if bad > 1 else ''} "
                         "(NaN or infinity)")


def _check_groups(where: str, groups: dict) -> None:
    params, momentum = groups["param"], groups["momentum"]
    if not params:
        raise VggenError(f"{where} holds no parameters (no param/ arrays)")
    for k in sorted(params.keys() | momentum.keys()):
        if k not in momentum:
            raise VggenError(f"{where}: param/{k} has no momentum/{k}")
        if k not in params:
            raise VggenError(f"{where}: momentum/{k} has no param/{k}")
        if params[k].shape != momentum[k].shape:
            raise VggenError(f"{where}: momentum/{k} has shape {momentum[k].shape}, "
                             f"but param/{k} has {params[k].shape}")


def _json_instead(path: Path) -> str:
    """The error for a JSON file given as the checkpoint (the readable header copy)."""
    for npz in (path.with_suffix(".npz"), path.parent / FILENAME):
        if npz.is_file():
            return (f"{path} is the readable copy of a checkpoint's header; resume from "
                    f"{npz} or the directory {path.parent}")
    return (f"cannot read checkpoint {path}: it is a JSON file; a checkpoint is the "
            f"{FILENAME} that `vggen train --checkpoint DIR` writes")


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save` and check it (see the module
    docstring); VggenError names the file, and the field or array, if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise VggenError(f"checkpoint {path} does not exist")
    if path.suffix.lower() == ".json":
        raise VggenError(_json_instead(path))
    where = f"checkpoint {path}"
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise VggenError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not head:
        raise VggenError(f"cannot read checkpoint {path}: the file is empty")
    if head != b"PK\x03\x04":        # every .npz is a zip archive; np.load would try a pickle
        raise VggenError(f"cannot read checkpoint {path}: it is not an .npz archive")
    groups: dict = {g: {} for g in GROUPS}
    try:
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise VggenError(f"{path} is not a vggen checkpoint (no header)")
            names = ["header"] + [n for n in z.files if n.partition("/")[0] in GROUPS]
            arrays = {}
            for name in names:
                try:
                    arrays[name] = z[name]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                    raise VggenError(f"{where}: {name} cannot be read ({e})") from None
    except VggenError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VggenError(f"cannot read checkpoint {path}: the .npz archive is damaged or "
                         f"truncated ({e})") from None
    header = _parse_header(where, arrays.pop("header"))
    for name, a in arrays.items():
        _check_array(where, name, a)
        prefix, _, key = name.partition("/")
        groups[prefix][key] = a
    _check_groups(where, groups)
    return Checkpoint(header, groups["param"], groups["momentum"], groups["state"])


__all__ = ["Checkpoint", "save", "load", "check_layer_files", "FILENAME"]
