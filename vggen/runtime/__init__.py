"""Runtime: one backend per target, chosen by name.

``get_backend("auto")`` picks cuda when CuPy and a GPU are present, else c.
"""

from __future__ import annotations

from vggen.errors import VggenError
from vggen.runtime.base import Backend
from vggen.runtime.numpy import NumpyBackend

TARGETS = ("auto", "c", "cuda", "numpy")


def cuda_available() -> bool:
    """CuPy importable and at least one GPU visible."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:       # ImportError, CUDARuntimeError, missing driver...
        return False


def resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise VggenError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if target == "auto":
        return "cuda" if cuda_available() else "c"
    return target


_BACKENDS: dict[str, Backend] = {}


def get_backend(target: str = "auto") -> Backend:
    """The backend for ``target`` (``auto``, ``c``, ``cuda`` or ``numpy``), created once."""
    target = resolve_target(target)
    if target not in _BACKENDS:
        if target == "numpy":
            _BACKENDS[target] = NumpyBackend()
        elif target == "c":
            from vggen.runtime.c import CBackend
            _BACKENDS[target] = CBackend()
        else:
            from vggen.runtime.cuda import CudaBackend
            _BACKENDS[target] = CudaBackend()
    return _BACKENDS[target]


__all__ = ["get_backend", "resolve_target",
           "cuda_available", "TARGETS"]
