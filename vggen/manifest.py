"""``generated/manifest.json``: its one reader, for the runtime and the tools.

The manifest lists the kernels: per kernel its name, target, layer,
direction, class and ``signature`` — the ordered arguments (tensor pointers
it reads, then those it writes, then ``int`` sizes).  A layer's program is its
kernels in manifest order.

It also records, under ``files``, the SHA-256 of every file the build wrote:
:meth:`Manifest.verify_sources` holds a target's sources to it before a
backend compiles or loads them, so hand-edited kernels never run unnoticed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vggen.errors import VggenError
from vggen.frontend.lang import Layer
from vggen.paths import generated_dir

MANIFEST = "manifest.json"
# What each kernel target's backend compiles or loads from <generated>/<target>/:
# the files the manifest's hashes must vouch for.
SOURCES = {"c": (".c", ".h"), "cuda": (".cu", ".cuh")}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str        # "tensor" or "size"
    dtype: str       # "float32", "int32", or "int" for sizes
    access: str      # "read", "write", "size"


@dataclass(frozen=True)
class KernelSpec:
    name: str
    target: str
    layer: str       # the forward layer's name
    direction: str   # "forward" or "backward"
    cls: str
    args: tuple
    entry: dict      # the manifest entry as written

    @property
    def tensors(self) -> list[ArgSpec]:
        return [a for a in self.args if a.kind == "tensor"]

    @property
    def writes(self) -> list[str]:
        return [a.name for a in self.args if a.access == "write"]

    @property
    def reads(self) -> list[str]:
        return [a.name for a in self.args if a.access == "read"]

    @property
    def algorithm(self) -> str:
        """How it computes: "direct", or the name of another algorithm (``winograd4``)."""
        alg = self.entry.get("algorithm")
        return str(alg.get("name", "?")) if isinstance(alg, dict) else "direct"

    @property
    def replaces(self) -> str | None:
        """For another algorithm's kernel: the direct kernel it stands in for."""
        alg = self.entry.get("algorithm")
        return str(alg.get("replaces")) if isinstance(alg, dict) and alg.get("replaces") else None


def _arg(raw, kernel: str) -> ArgSpec:
    if isinstance(raw, dict):
        kind = raw.get("kind", "tensor")
        dtype = raw.get("dtype", "float32" if kind == "tensor" else "int")
        access = raw.get("access", "size" if kind == "size" else "read")
        return ArgSpec(str(raw["name"]), kind, str(dtype), str(access))
    raise VggenError(f"manifest: kernel {kernel}: cannot read argument {raw!r}")


def _spec(entry, path: Path) -> KernelSpec:
    try:
        name = str(entry["name"])
        args = tuple(_arg(a, name) for a in entry["signature"])
        return KernelSpec(name, str(entry.get("target", "")), str(entry["layer"]),
                          str(entry["direction"]), str(entry.get("class", "")), args, entry)
    except (KeyError, TypeError) as err:
        raise VggenError(f"{path}: malformed kernel entry {entry!r}: {err}") from err


@dataclass(frozen=True)
class Manifest:
    """One ``manifest.json``, read: the JSON as written and its kernels parsed."""

    path: Path
    data: dict                       # the parsed JSON, as written
    kernels: tuple                   # a KernelSpec per entry of data["kernels"], in file order

    @property
    def root(self) -> Path:
        """The generated directory the manifest's ``file`` entries are relative to."""
        return self.path.parent

    @property
    def entries(self) -> list[dict]:
        return self.data["kernels"]

    def of_target(self, target: str) -> list[KernelSpec]:
        return [k for k in self.kernels if k.target == target]

    def kernels_for(self, target: str, layer: Layer) -> list[KernelSpec]:
        """See :func:`kernels_for`."""
        return kernels_for(self.kernels, target, layer)

    def alternatives(self, spec: KernelSpec) -> list[KernelSpec]:
        """The kernels computing what ``spec`` computes by another algorithm
        (their entries' ``algorithm.replaces`` names it), in file order."""
        return [k for k in self.kernels if k.target == spec.target and k.replaces == spec.name]

    def verify_sources(self, target: str, allow_modified: bool = False) -> list[Path]:
        """Hold ``target``'s generated sources to the manifest's ``files`` hashes.

        Every source in ``<root>/<target>/`` (``SOURCES``) must be listed with
        the SHA-256 of its bytes, and every one listed must be there.  A
        mismatch is a one-line VggenError naming the file; with
        ``allow_modified`` it is a warning instead.  Returns the mismatched
        paths (none: the sources are the build's).
        """
        suffixes = SOURCES.get(target, ())
        files = self.data.get("files")
        listed = {rel: digest for rel, digest in (files.items() if isinstance(files, dict) else ())
                  if Path(rel).parent == Path(target) and Path(rel).suffix in suffixes}
        directory = self.root / target
        try:
            present = sorted(f"{target}/{p.name}" for p in directory.iterdir()
                             if p.suffix in suffixes and p.is_file()) if directory.is_dir() else []
        except OSError as e:
            raise VggenError(f"{_shown(directory)}: cannot list the kernel sources "
                             f"({e.strerror or e})") from None
        problems = []
        for rel in present:
            path = self.root / rel
            if rel not in listed:
                problems.append((path, "is not listed in the manifest"))
                continue
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as e:
                problems.append((path, f"cannot be read ({e.strerror or e})"))
                continue
            if digest != listed[rel]:
                problems.append((path, "differs from the manifest"))
        problems += [(self.root / rel, "is listed in the manifest but missing")
                     for rel in sorted(set(listed) - set(present))]
        if not problems:
            return []
        if allow_modified:
            log.warning("running MODIFIED kernels: %s (vggen build restores %s)",
                        "; ".join(f"{_shown(p)} {what}" for p, what in problems),
                        "it" if len(problems) == 1 else "them")
            return [p for p, _ in problems]
        path, what = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VggenError(f"{_shown(path)} {what}{more}: run `vggen build` to regenerate the kernels, "
                         f"or pass --allow-modified-kernels to run edited kernels")


def _shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except (ValueError, OSError):       # elsewhere, or no working directory any more
        return str(path)


def read_manifest(generated: str | Path | None = None) -> Manifest:
    """The manifest of ``generated`` (default :func:`vggen.paths.generated_dir`).

    A missing or malformed file is a one-line VggenError that says to run
    ``vggen build``.
    """
    root = Path(generated) if generated is not None else generated_dir()
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VggenError(f"{path} not found: run `vggen build` (or pass --generated DIR)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VggenError(f"{path}: cannot read the manifest ({e}); run `vggen build`") from None
    if not isinstance(data, dict) or not isinstance(data.get("kernels"), list):
        raise VggenError(f"{path}: not a vggen manifest (no kernel list); run `vggen build`")
    return Manifest(path, data, tuple(_spec(e, path) for e in data["kernels"]))


def load_manifest(generated: str | Path | None = None) -> tuple[Path, dict]:
    """(the generated directory, its manifest as written): for readers of the raw entries."""
    manifest = read_manifest(generated)
    return manifest.root, manifest.data


def _strip_specialisation(name: str) -> str:
    """'Convolution2D(K=1)' → 'Convolution2D'."""
    return name.split("(", 1)[0]


def kernels_for(specs: list[KernelSpec], target: str, layer: Layer) -> list[KernelSpec]:
    """The kernels of ``layer`` (forward or backward program) for ``target``, in order.

    A layer built with a concrete window (``convolution2d(1)``, named
    ``Convolution2D(K=1)``) also matches kernels generated from the generic
    layer with that window specialised (``Convolution2D``).
    """
    name, direction = layer.forward_name, layer.direction
    # only kernels writing what this layer computes: a layer whose intermediates
    # are given (``Layer.with_given``) runs the rest of the generated kernels
    computed = {t.name for t in layer.tensors if t.role.is_written}
    mine = [k for k in specs if k.target == target and k.direction == direction
            and set(k.writes) <= computed and k.replaces is None]
    exact = [k for k in mine if k.layer == name]
    if exact:
        return exact
    return [k for k in mine if _strip_specialisation(k.layer) == _strip_specialisation(name)]


def eval_size(expr: str, sizes: dict) -> int:
    """A manifest size expression (``"OC"``, ``"3"``, ``"(B*H + 255) // 256"``) → int.

    Only integers, size names, ``+ - * // %`` and parentheses are accepted.
    """
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise VggenError(f"manifest expression {expr!r}: no value for size {node.id}")
            return int(sizes[node.id])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise VggenError(f"manifest expression {expr!r}: cannot evaluate {ast.dump(node)}")
    try:
        tree = ast.parse(str(expr).strip(), mode="eval")
    except SyntaxError as e:
        raise VggenError(f"manifest expression {expr!r} is not an expression") from e
    return ev(tree)


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def check_manifest_shape(spec: KernelSpec, arg: ArgSpec, shape: tuple, sizes: dict) -> None:
    """The manifest's shape of ``arg`` (strings in the sizes) must be the layer's ``shape``."""
    raw = next((a.get("shape") for a in spec.entry.get("signature", [])
                if isinstance(a, dict) and a.get("name") == arg.name), None)
    if raw is None:
        return
    theirs = tuple(eval_size(e, sizes) for e in raw)
    if theirs != tuple(shape):
        raise VggenError(f"kernel {spec.name}: argument {arg.name} has shape {theirs} "
                         f"({', '.join(raw)}) in the manifest but {tuple(shape)} in layer "
                         f"{spec.layer}: was it generated for another window size?")
