"""Training checkpoints: one ``.npz`` per save, written atomically.

A checkpoint holds the parameters (``param/<name>``), the optimizer state
(``momentum/<name>``, the SGD velocity), the BatchNormalization running
statistics (``state/<name>``) and a JSON header (``header``, UTF-8 bytes):
format version, the training config, the number of epochs completed, the
state of the random generator, and the metrics of every epoch so far.  The
header is also written beside it as ``<name>.json`` for people to read;
:func:`load` trusts only the copy inside the ``.npz``.

Writing goes to a temporary file in the same directory, is flushed to disk,
then renamed over the old file (``os.replace``), so a crash or an error at
any point leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggen.atomic import write_atomic
from vggen.errors import VggenError

FORMAT = "vggen-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"


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


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save`; VggenError names the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise VggenError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise VggenError(f"{path} is not a vggen checkpoint (no header)")
            header = json.loads(z["header"].tobytes().decode("utf-8"))
            groups: dict = {"param": {}, "momentum": {}, "state": {}}
            for name in z.files:
                prefix, _, key = name.partition("/")
                if prefix in groups:
                    groups[prefix][key] = z[name]
    except VggenError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, UnicodeDecodeError,
            json.JSONDecodeError) as e:
        raise VggenError(f"cannot read checkpoint {path}: {e}") from e
    if header.get("format") != FORMAT:
        raise VggenError(f"{path} is not a vggen checkpoint")
    if header.get("version") != VERSION:
        raise VggenError(f"checkpoint {path} has format version {header.get('version')}; "
                         f"this vggen reads version {VERSION}")
    for key in ("epoch", "config", "rng"):
        if key not in header:
            raise VggenError(f"checkpoint {path}: header has no {key!r}")
    return Checkpoint(header, groups["param"], groups["momentum"], groups["state"])


__all__ = ["Checkpoint", "save", "load", "FILENAME"]
