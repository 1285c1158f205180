"""CUDA for the Winograd variants of a 3×3 correlation (``vggen.compiler.passes.winograd``):
``<kernel>_winograd<m>``, with the direct kernel's signature, beside it in the
layer's ``.cu`` file (shared parts: ``vggen.compiler.targets.winograd``).

Both forms are one batched product M[k] = Σ_q L[k][q]ᵀ R[k][q] over the n²
transform positions k, run in one launch (``templates/cuda/winograd.cu.j2``):

* **data** (forward, ∂L/∂x): rows r are the output channels o, columns s the
  m×m output tiles, terms q the data's channels c; L = G g Gᵀ of the filter
  taps (transformed as they are staged: no workspace), R = Bᵀ d B of the
  data tiles.
* **filter** (∂L/∂w): rows r are ∂L/∂y's channels o, columns s the data's
  channels c, terms q the tiles; L = G g Gᵀ of ∂L/∂y's m×m tiles, R = Bᵀ d B
  of the data tiles under them.  Each (o, c) sums its own tiles in order: no
  atomics, the same bits from any grid.

A block takes one work item (``BLOCKS.rows`` × ``BLOCKS.cols`` of (r, s)) at a
time, grid-striding; it stages ``BLOCKS.chunk`` terms of L and R in shared
memory, each thread transforming one, then every thread accumulates a
``BLOCKS.sub`` × ``BLOCKS.sub`` block of (r, s) at its transform positions
(k ≡ its group mod the number of groups) in registers.  M goes through shared
memory once per item to the output transform Aᵀ M A and the stores.  The
reads, padding tests and stores are the kernel's IR expressions; the
transforms are printed from the matrices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jinja2

from vggen.compiler.ir import Kernel
from vggen.compiler.passes.winograd import WinogradMatch
from vggen.compiler.targets.base import GeneratedKernel, tidy
from vggen.compiler.targets.cuda.constants import THREADS
from vggen.compiler.targets.cuda.printer import CudaPrinter
from vggen.compiler.targets.winograd import (
    algorithm_entry,
    comment_lines,
    definitions,
    shift,
    transforms,
    transforms_for,
    variant_name,
)

# where a transform reads element e of its input and writes element e of its result
SOURCE, RESULT = "vg_src[{e} * vg_ss]", "vg_dst[{e} * vg_ds]"


@dataclass(frozen=True)
class Blocks:
    """The work split of a Winograd kernel (see the module docstring)."""

    rows: int = 16      # rows r (channels o) per work item
    cols: int = 16      # columns s (tiles, or channels c) per work item
    chunk: int = 8      # terms q staged in shared memory at a time
    sub: int = 4        # a thread's sub × sub block of (r, s)

    @property
    def subs(self) -> int:
        """Sub-blocks per work item: the threads that share one transform position."""
        return (self.rows // self.sub) * (self.cols // self.sub)

    @property
    def groups(self) -> int:
        """Groups of threads, each taking the transform positions k ≡ its index."""
        return THREADS // self.subs

    def positions(self, n: int) -> int:
        """Transform positions per thread (some threads' last one is past n²)."""
        return -(-n * n // self.groups)

    def shared_floats(self, n: int) -> int:
        """The block's shared memory: the staged L and R, later M."""
        return n * n * max(self.chunk * (self.rows + self.cols), self.rows * self.cols)


BLOCKS = Blocks()
assert BLOCKS.subs * BLOCKS.groups == THREADS and BLOCKS.rows % BLOCKS.sub == 0 and BLOCKS.cols % BLOCKS.sub == 0


@dataclass(frozen=True)
class WinogradLaunch:
    """A Winograd kernel's launch: one block per work item, VG_THREADS threads,
    any grid (the blocks stride over the items)."""

    form: str
    tile: int
    sizes: dict         # role → size expression (Python, in the size names)
    mode = "winograd"   # beside mapping.Schedule's "thread" and "block"

    def grid(self) -> str:
        s = self.sizes
        rows = f"(({s['O']}) + {BLOCKS.rows - 1}) // {BLOCKS.rows}"
        if self.form == "data":
            m = self.tile
            tiles = f"({s['B']}) * ((({s['H']}) + {m - 1}) // {m}) * ((({s['W']}) + {m - 1}) // {m})"
            cols = f"({tiles} + {BLOCKS.cols - 1}) // {BLOCKS.cols}"
        else:
            cols = f"(({s['C']}) + {BLOCKS.cols - 1}) // {BLOCKS.cols}"
        return f"{rows} * ({cols})"

    def manifest(self) -> dict:
        return {"mode": self.mode, "threads": THREADS, "block": [THREADS, 1, 1], "grid": [self.grid(), "1", "1"],
                "grid_any": True, "dynamic_shared_bytes": 0}


def render_variant(kernel: Kernel, found: WinogradMatch, m: int, env: jinja2.Environment) -> GeneratedKernel:
    """The ``winograd<m>`` variant of ``kernel`` (its direct signature)."""
    name = variant_name(kernel.name, m)
    ir = dataclasses.replace(kernel, name=name)
    t = transforms_for(found, m)
    fns = transforms(t, CudaPrinter, SOURCE, RESULT)
    p = CudaPrinter(kernel.tensors)
    sizes = {role: p.code(e) for role, e in found.sizes.items()}
    text = env.get_template("cuda/winograd.cu.j2").render(
        name=name, comment=comment_lines(ir, t), params=p.params(ir.args), form=found.form,
        m=t.m, n=t.n, r=t.r, tile=m, sizes=sizes, origin=shift(found.origin), b=BLOCKS, kt=BLOCKS.positions(t.n),
        shared=BLOCKS.shared_floats(t.n), transforms=fns,
        data=p.code(found.data), data_inside=p.code(found.data_inside),
        taps=[p.code(e) for row in found.taps for e in row],
        gradient=p.code(found.gradient) if found.gradient is not None else None,
        gradient_inside=p.code(found.gradient_inside) if found.gradient_inside is not None else None,
        stores=([p.code(found.stores[0])] if found.form == "data"
                else [p.code(e) for row in found.stores for e in row]))
    how = WinogradLaunch(found.form, m, {role: str(e) for role, e in found.sizes.items()})
    return GeneratedKernel(ir, "cuda", tidy(text), schedule=how, used=p.used,
                           algorithm=algorithm_entry(kernel, found, t, m),
                           definitions=definitions(fns, env.get_template("cuda/winograd_transform.cu.j2")))



__all__ = ["BLOCKS", "Blocks", "WinogradLaunch", "render_variant"]
