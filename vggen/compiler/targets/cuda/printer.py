"""CUDA printer for kernel arithmetic: the C printer's, for device code."""

from __future__ import annotations

from vggen.compiler.targets.c.printer import CPrinter


class CudaPrinter(CPrinter):
    """The same arithmetic for CUDA device code (compiled by nvcc or NVRTC:
    no headers, so no ``INFINITY`` and no ``int32_t``)."""

    restrict = "__restrict__"
    int_type = "int"
    neg_inf = "__int_as_float(0xff800000)"
    target = "cuda"
