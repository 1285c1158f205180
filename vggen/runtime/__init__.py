"""Runtime: the backend registry, one backend per target, chosen by name.

``get_backend("auto")`` picks cuda when CuPy and a GPU are present, else c.
Each backend is created once, on first use; the c and cuda backends are
imported only then, so that a compiler or CuPy is needed only by the target
that uses it.
"""

from __future__ import annotations

from collections.abc import Callable

from vggen.errors import VggenError
from vggen.runtime.base import Backend
from vggen.runtime.numpy import NumpyBackend


def _c_backend() -> Backend:
    from vggen.runtime.c import CBackend
    return CBackend()


def _cuda_backend() -> Backend:
    from vggen.runtime.cuda import CudaBackend
    return CudaBackend()


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "c": _c_backend,
    "cuda": _cuda_backend,
    "numpy": NumpyBackend,
}
TARGETS = ("auto", *_FACTORIES)


def cuda_available() -> bool:
    """CuPy importable and at least one GPU visible."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:       # ImportError, CUDARuntimeError, missing driver...
        return False


def resolve_target(target: str) -> str:
    """``target`` itself, or for ``auto`` the target of this machine."""
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
        _BACKENDS[target] = _FACTORIES[target]()
    return _BACKENDS[target]


__all__ = ["TARGETS", "cuda_available", "get_backend", "resolve_target"]
