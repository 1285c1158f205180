"""Where vggen finds and keeps its files: the one resolver.

* templates: ``templates/`` at the top of a source checkout, else the copy
  the wheel ships inside the package (``vggen/_templates``);
* generated kernels (:func:`generated_dir`): ``$VGGEN_GENERATED``, else
  ``./generated`` when a ``vggen build`` wrote one there, else the kernels
  shipped with vggen (a checkout's ``generated/``, a wheel's
  ``vggen/_generated``);
* compiled libraries (:func:`cache_dir`): ``$VGGEN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/vggen``, else ``~/.cache/vggen``.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"


def _shipped(checkout_name: str, packaged_name: str) -> Path:
    """A checkout's top-level directory where there is one, else the wheel's packaged copy."""
    checkout = PACKAGE.parent / checkout_name
    return checkout if checkout.is_dir() else PACKAGE / packaged_name


def templates_dir() -> Path:
    return _shipped("templates", "_templates")


def shipped_generated() -> Path:
    """The kernels that came with vggen (committed in a checkout, packaged in a wheel)."""
    return _shipped("generated", "_generated")


def generated_dir() -> Path:
    """Where the kernels to run and inspect are: see the module docstring."""
    env = os.environ.get("VGGEN_GENERATED")
    if env:
        return Path(env)
    here = Path("generated")
    return here if (here / MANIFEST).is_file() else shipped_generated()


def cache_dir() -> Path:
    env = os.environ.get("VGGEN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vggen"
