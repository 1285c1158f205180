"""What every target offers the build (``vggen.compiler.emit``), and what they share.

A target takes lowered kernels (``vggen.compiler.ir``) to source text: it
may rewrite them first (``prepare``), decides how each runs (``schedule``),
prints each through its printer into its templates (``render_kernel``), puts
them into one source file (``render_file``), and says what the manifest
records of each (``manifest``).  Templates live in
``templates/<target>/<class>.<ext>.j2``, one per kernel class; they hold
loops, schedule and launch only: every expression is printed from the IR.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import jinja2
import sympy as sp

from vggen.compiler.ir import Kernel
from vggen.compiler.targets.names import identifier
from vggen.frontend.functions import HELPERS, check_functions
from vggen.paths import templates_dir


@dataclass
class GeneratedKernel:
    """One kernel as emitted for one target."""

    ir: Kernel
    target: str
    text: str                      # the kernel's own code (comment + function; a tiled one's fallback too)
    tiled: Any = None              # CUDA: its tiled GEMM schedule, where it runs as one (see ``fallback``)
    schedule: Any = None           # the target's schedule of it
    used: set = field(default_factory=set)      # the vg_* helpers its code calls
    fallback: str | None = None    # CUDA: the name of a tiled kernel's simple-schedule copy
    algorithm: dict | None = None  # another algorithm for a kernel (its name, the kernel it replaces)
    definitions: dict = field(default_factory=dict)   # name → code it calls that its file defines once

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class Target(Protocol):
    """A code generation target (see the module docstring)."""

    name: str                      # "c", "cuda": its templates' folder
    ext: str                       # its source files' extension

    def prepare(self, kernels: list[Kernel]) -> list[Kernel]: ...

    def schedule(self, kernel: Kernel) -> Any: ...

    def render_kernel(self, kernel: Kernel, env: jinja2.Environment) -> GeneratedKernel: ...

    def variants(self, kernel: Kernel, env: jinja2.Environment) -> list[GeneratedKernel]:
        """Kernels computing the same as ``kernel`` by other algorithms, with its
        signature (``GeneratedKernel.algorithm`` names each); may be none."""
        ...

    def render_file(self, kernels: list[GeneratedKernel], what: str, env: jinja2.Environment) -> str: ...

    def manifest(self, g: GeneratedKernel) -> dict: ...


def _finalize(value):
    """A symbol a template prints is a loop variable or a user's index: its
    identifier (``names.identifier``), like every name the printers print."""
    return identifier(value.name) if isinstance(value, sp.Symbol) else value


def environment() -> jinja2.Environment:
    """The templates' Jinja2 environment (strict: an undefined name is an error).
    ``{{ symbol }}`` prints the symbol's identifier; ``ident`` maps a name
    given as a string (a tensor's) the same way."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False, finalize=_finalize)
    env.filters["ident"] = lambda name: identifier(str(name))
    return env


def function_helpers(used: set, qualifiers: str) -> list[str]:
    """The definitions of the function table's ``vg_*`` helpers among ``used``,
    each with the target's storage ``qualifiers``, in the table's order."""
    out = []
    for name, text in HELPERS.items():
        if name in used:
            *notes, definition = text.split("\n")
            out.append("\n".join(notes + [f"{qualifiers} {definition}"]))
    return out


def check_kernel_functions(kernel: Kernel) -> None:
    """VggenError naming the function and the equation where a kernel applies a
    function outside the table (``vggen.frontend.functions``), before any of it
    is printed."""
    for stage in kernel.stages:
        exprs = [stage.value] + [e for r in stage.reductions for e in [r.body, *[b for _, b in r.positions]]
                                 if e is not None]
        for e in exprs:
            check_functions(e, f"kernel {kernel.name}, equation {stage.source}")


def number(v):
    """A SymPy number as a Python int or float (for comments and the manifest)."""
    v = sp.sympify(v)
    return int(v) if v.is_Integer else float(v)


def comment(kernel: Kernel) -> list[str]:
    """The comment above a kernel: what it is, its source equations, how it runs."""
    lines = [f"{kernel.name}: {kernel.cls.value} ({kernel.layer}, {kernel.direction})"]
    lines += [f"  {eq}" for eq in kernel.equations]
    used = {str(k): v for k, v in kernel.specialise.items()}
    if used:
        lines.append("  specialised: " + ", ".join(f"{k}={number(v)}" for k, v in sorted(used.items())))
    return lines


def tidy(text: str) -> str:
    """A kernel's rendered text without empty lines: macros leave them where
    their blocks end, and a kernel has no intended one."""
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip()) + "\n"


def shared_definitions(kernels: list[GeneratedKernel]) -> list[str]:
    """The code the kernels call and their file defines once (``definitions``:
    the Winograd transforms), first use first; a ValueError where two kernels
    give one name two texts."""
    out: dict[str, str] = {}
    for g in kernels:
        for name, text in g.definitions.items():
            if out.setdefault(name, text) != text:
                raise ValueError(f"{g.name}: {name} is defined differently by another kernel")
    return list(out.values())


def helpers_used(kernels: list[GeneratedKernel]) -> set:
    """The helpers a file defines: those its kernels call (an unused static
    function is a warning)."""
    return set().union(*[g.used for g in kernels])
