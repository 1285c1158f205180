"""``vggen inspect``: one layer's equations and its generated kernels.

Prints the layer's forward equations, the backward equations vggen derives
from them, and the source text of the layer's kernels for one target, sliced
out of the files in ``generated/``: each kernel's text runs from its leading
comment (``// <name>: …``) to the end of its body, and is checked against the
sha256 the manifest records for it, so a stale ``generated/`` is reported
rather than shown.

The manifest is read by :func:`vggen.manifest.load_manifest`; ``kernels_of``
here is shared with ``vggen.tools.report``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from vggen.errors import VggenError
from vggen.manifest import load_manifest

# --------------------------------------------------------------------------- manifest


def kernels_of(manifest: dict, layer: str, direction: str | None = None, writes: str | None = None,
               target: str | None = None) -> list[dict]:
    """The manifest's kernel entries of ``layer`` (in manifest order), optionally
    only one direction, those that write tensor ``writes``, one target."""
    return [k for k in manifest["kernels"]
            if k.get("layer") == layer
            and (direction is None or k.get("direction") == direction)
            and (writes is None or writes in k.get("writes", ()))
            and (target is None or k.get("target") == target)]


# --------------------------------------------------------------------------- layers


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def find_layer(name: str, layers=None):
    """The layer called ``name``: case-insensitive, ignoring ``_``/``-``/``+``/spaces;
    an unambiguous prefix is enough (``conv``, ``batchnorm``, ``max_pool``),
    failing that an unambiguous part of the name (``pool``, ``norm``).  A
    match that every other match is a composition of wins (``batchnorm`` is
    BatchNormalization, not BatchNormalization+ReLU)."""
    from vggen.compiler.emit import generated_layers

    layers = generated_layers() if layers is None else list(layers)
    names = ", ".join(layer.name for layer in layers)
    key = _key(name)
    if not key:
        raise VggenError(f"no layer named {name!r}; the layers are: {names}")
    exact = [layer for layer in layers if _key(layer.name) == key]
    if exact:
        return exact[0]
    for match in (lambda k: k.startswith(key), lambda k: key in k):
        found = [layer for layer in layers if match(_key(layer.name))]
        base = [f for f in found
                if all(g is f or f.name in (part.name for part, _ in g.parts) for g in found)]
        if len(found) == 1 or len(base) == 1:
            return (base or found)[0]
        if found:
            raise VggenError(f"layer {name!r} is ambiguous: it could be "
                             + ", ".join(layer.name for layer in found))
    raise VggenError(f"no layer named {name!r}; the layers are: {names}")


# --------------------------------------------------------------------------- kernel text


def kernel_text(root: Path, entry: dict) -> str:
    """The kernel's text in its generated file, from its comment to the end of
    its body (kernels hold no empty line; one separates them), checked against
    the manifest's sha256."""
    path = root / entry["file"]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise VggenError(f"{path}: cannot read ({e.strerror or e}); run `vggen build`") from None
    head = f"// {entry['name']}: "
    start = next((n for n, line in enumerate(lines) if line.startswith(head)), None)
    if start is None:
        raise VggenError(f"{path} has no kernel {entry['name']}: generated/ is stale; run `vggen build`")
    end = next((n for n in range(start, len(lines)) if not lines[n].strip()), len(lines))
    text = "\n".join(lines[start:end]) + "\n"
    if entry.get("sha256") and hashlib.sha256(text.encode()).hexdigest() != entry["sha256"]:
        raise VggenError(f"{path}: kernel {entry['name']} differs from the manifest's hash: "
                         f"generated/ is stale; run `vggen build`")
    return text


def definition_text(root: Path, file: str, name: str) -> str:
    """A function the file defines once for its kernels (``calls`` in the
    manifest: a Winograd transform), with the comment line above it."""
    path = root / file
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith("static ") and f" {name}(" in line), None)
    if start is None:
        raise VggenError(f"{path} does not define {name}: generated/ is stale; run `vggen build`")
    start -= 1 if start > 0 and lines[start - 1].startswith("//") else 0
    end = next(n for n in range(start, len(lines)) if lines[n] == "}")
    return "\n".join(lines[start:end + 1]) + "\n"


# --------------------------------------------------------------------------- the listing


def inspect_layer(name: str, target: str = "c", generated: str | Path | None = None) -> str:
    """The text ``vggen inspect`` prints."""
    from vggen.derive.autodiff import derive
    from vggen.proof.document import document_equations

    if target not in ("c", "cuda"):
        raise VggenError(f"target must be c or cuda, not {target!r}")
    layer = find_layer(name)
    root, manifest = load_manifest(generated)
    entries = kernels_of(manifest, layer.name, target=target)
    bw = derive(layer)
    docs = document_equations()

    def made_by(direction, tensor):
        names = [e["name"] for e in kernels_of(manifest, layer.name, direction, tensor, target)]
        return "kernel " + ", ".join(names) if names else "no kernel"

    out = [f"{layer.name}", "=" * len(layer.name), "", "Forward equations:"]
    for eq in layer.equations:
        notes = ([eq.label] if eq.label else []) + [made_by("forward", eq.target)]
        out.append(f"  {eq}  ({'; '.join(notes)})")
    out += ["", "Derived backward equations (g_T is ∂L/∂T):" if bw.gradients
            else "No backward: an in-place update of state."]
    for g in bw.gradients:
        numbers = [d.number for d in docs if d.layer == layer.name and d.gradient == g.tensor.name]
        notes = [f"document: eq. {', '.join(numbers)}" if numbers else "not in the document",
                 made_by("backward", g.tensor.name)]
        out.append(f"  {g.equation}  ({'; '.join(notes)})")
    files = list(dict.fromkeys(e["file"] for e in entries))
    out += ["", f"Generated {'C' if target == 'c' else 'CUDA'} kernels "
            f"({', '.join(str(root / f) for f in files) or 'none'}):"]
    if not entries:
        out.append(f"  none: the manifest in {root} lists no {target} kernel of {layer.name}")
    for e in entries:
        out += ["", kernel_text(root, e).rstrip("\n")]
    calls = {(name, e["file"]): None for e in entries for name in e.get("calls", ())}
    if calls:
        out += ["", "Defined once in the file for the kernels above that call them:"]
        for name, file in calls:
            out += ["", definition_text(root, file, name).rstrip("\n")]
    return "\n".join(out) + "\n"
