"""The measured algorithm choices of ``vggen tune`` per target (``RECORD_FILES``
under ``generated/``: ``algorithms.json`` for c, ``algorithms-cuda.json`` for
cuda): read by the build, which copies them into the manifest (the target's
direct kernel's ``measured`` entries, read by ``vggen.runtime.algorithms``),
written by the tuner (``vggen.tools.tune_algorithms``).

A record: ``{"device": CPU, "kernels": {direct kernel: [{"sizes": {size: int},
"algorithm": name, "ms": {algorithm: ms}}]}}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vggen.errors import VggenError

# beside the manifest; inputs of the build
RECORD_FILES = {"c": "algorithms.json", "cuda": "algorithms-cuda.json"}
ALGORITHMS_FILE = RECORD_FILES["c"]


def load_records(path: Path) -> dict:
    """``{"device": str, "kernels": {name: [record]}}`` from ``path`` (empty where
    there is none); a VggenError naming the file where it cannot be read."""
    if not path.is_file():
        return {"device": "", "kernels": {}}
    try:
        data = json.loads(path.read_text())
        kernels = data["kernels"] if isinstance(data, dict) else None
        if not isinstance(kernels, dict):
            raise TypeError("no kernel table")
        for name, recs in kernels.items():
            if not isinstance(recs, list):
                raise TypeError(name)
            for r in recs:
                if not isinstance(r, dict) or not isinstance(r["sizes"], dict) or not isinstance(r["algorithm"], str):
                    raise TypeError(name)
        return {"device": str(data.get("device", "")), "kernels": kernels}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VggenError(f"{path}: not a record of `vggen tune` ({type(e).__name__}: {e}); "
                         f"rerun it or delete the file") from None


def merge(old: dict, device: str, measured: dict) -> dict:
    """``old`` with the records of ``measured`` (name → [record]) replacing those
    of the same kernel and sizes (all of ``old``'s where it is another device's);
    sorted, so that the file is reproducible."""
    kernels = {name: list(recs) for name, recs in old["kernels"].items()} if old["device"] == device else {}
    for name, recs in measured.items():
        kept = [r for r in kernels.get(name, []) if all(r["sizes"] != n["sizes"] for n in recs)]
        kernels[name] = sorted(kept + recs, key=lambda r: sorted(r["sizes"].items()))
    return {"device": device, "kernels": dict(sorted(kernels.items()))}


__all__ = ["ALGORITHMS_FILE", "RECORD_FILES", "load_records", "merge"]
