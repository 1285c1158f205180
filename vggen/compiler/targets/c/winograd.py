"""C for the Winograd forward convolution, its transforms printed from the
matrices of :mod:`vggen.derive.winograd` by the C printer.

Each transform is one function whose statements are the entries of
Bᵀ d B, G g Gᵀ and Aᵀ M A, expanded symbolically and printed (float32
literals, no hand-written coefficient).  The driver around them only moves
data: it cuts padded n×n tiles, calls the data and filter transforms, does the
channel sums as one plain matrix product per transform position, and calls
the output transform; its loops hold index arithmetic only.  It is a reference
for the layout the packed-GEMM kernel is to take, not a fast kernel, and is not
part of generated/ (nothing in the network calls it yet).
"""

from __future__ import annotations

import sympy as sp

from vggen.compiler.targets.c.printer import CPrinter
from vggen.derive.winograd import WinogradTransforms, forward_transforms


def _assignments(out: str, matrix: sp.Matrix, inputs: dict) -> list[str]:
    """``out[k] = …;`` for each entry of ``matrix`` (row-major), its symbols
    printed as ``inputs`` names them."""
    printer = CPrinter({}, aliases=inputs)
    return [f"    {out}[{i * matrix.cols + j}] = {printer.code(sp.expand(matrix[i, j]))};"
            for i in range(matrix.rows) for j in range(matrix.cols)]


def _symbol_grid(name: str, rows: int, cols: int):
    grid = sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}_{j}"))
    aliases = {grid[i, j]: f"{name}[{i * cols + j}]" for i in range(rows) for j in range(cols)}
    return grid, aliases


def transform_functions(t: WinogradTransforms, prefix: str) -> str:
    """The three transforms of ``t`` as static C functions."""
    n, m, r = t.n, t.m, t.r
    d, d_names = _symbol_grid("d", n, n)
    g, g_names = _symbol_grid("g", r, r)
    M, m_names = _symbol_grid("M", n, n)
    parts = [
        f"/* V = Bᵀ d B for one {n}×{n} tile d (row-major). */",
        f"static void {prefix}_data(const float *restrict d, float *restrict v)\n{{",
        *_assignments("v", t.BT * d * t.BT.T, d_names), "}\n",
        f"/* U = G g Gᵀ for one {r}×{r} filter g. */",
        f"static void {prefix}_filter(const float *restrict g, float *restrict u)\n{{",
        *_assignments("u", t.G * g * t.G.T, g_names), "}\n",
        f"/* Y = Aᵀ M A: one {m}×{m} output tile. */",
        f"static void {prefix}_output(const float *restrict M, float *restrict y)\n{{",
        *_assignments("y", t.AT * M * t.AT.T, m_names), "}\n",
    ]
    return "\n".join(parts)


def forward_source(m: int = 2) -> str:
    """A C file defining ``winograd_f{m}x3_forward`` (see its comment)."""
    t = forward_transforms(m)
    n, prefix = t.n, f"winograd_f{m}x3"
    return f"""/* Winograd {t.name} forward convolution, 3×3, stride 1, zero padding 1, NCHW.
   Printed by vggen.compiler.targets.c.winograd from Toom–Cook transforms on the
   points {", ".join(map(str, t.points))}, ∞. */
#include <stddef.h>
#include <string.h>

{transform_functions(t, prefix)}
/* y (B, OC, H, W) from x (B, IC, H, W) and w (OC, IC, 3, 3).  Workspace:
   U: {n * n}·OC·IC, V: {n * n}·IC·T, M: {n * n}·OC·T floats, T = B·⌈H/{m}⌉·⌈W/{m}⌉. */
void {prefix}_forward(int B, int IC, int OC, int H, int W, const float *restrict x,
                      const float *restrict w, float *restrict y, float *restrict U,
                      float *restrict V, float *restrict M)
{{
    const int TH = (H + {m - 1}) / {m}, TW = (W + {m - 1}) / {m};
    const long T = (long)B * TH * TW;
    float tile[{n * n}], out[{n * n}];
    for (int oc = 0; oc < OC; ++oc)
        for (int ic = 0; ic < IC; ++ic) {{
            {prefix}_filter(w + ((long)oc * IC + ic) * 9, out);
            for (int k = 0; k < {n * n}; ++k)
                U[((long)k * OC + oc) * IC + ic] = out[k];
        }}
    for (int b = 0; b < B; ++b)
        for (int ic = 0; ic < IC; ++ic)
            for (int th = 0; th < TH; ++th)
                for (int tw = 0; tw < TW; ++tw) {{
                    const long t = ((long)b * TH + th) * TW + tw;
                    for (int u = 0; u < {n}; ++u)
                        for (int v = 0; v < {n}; ++v) {{
                            const int i = th * {m} + u - 1, j = tw * {m} + v - 1;
                            tile[u * {n} + v] = (i >= 0 && i < H && j >= 0 && j < W)
                                ? x[(((long)b * IC + ic) * H + i) * W + j] : 0.0f;
                        }}
                    {prefix}_data(tile, out);
                    for (int k = 0; k < {n * n}; ++k)
                        V[((long)k * IC + ic) * T + t] = out[k];
                }}
    /* one (OC × IC)·(IC × T) product per transform position */
    for (int k = 0; k < {n * n}; ++k)
        for (int oc = 0; oc < OC; ++oc) {{
            float *restrict row = M + ((long)k * OC + oc) * T;
            memset(row, 0, sizeof(float) * (size_t)T);
            for (int ic = 0; ic < IC; ++ic) {{
                const float a = U[((long)k * OC + oc) * IC + ic];
                const float *restrict col = V + ((long)k * IC + ic) * T;
                for (long t = 0; t < T; ++t)
                    row[t] += a * col[t];
            }}
        }}
    for (int b = 0; b < B; ++b)
        for (int oc = 0; oc < OC; ++oc)
            for (int th = 0; th < TH; ++th)
                for (int tw = 0; tw < TW; ++tw) {{
                    const long t = ((long)b * TH + th) * TW + tw;
                    for (int k = 0; k < {n * n}; ++k)
                        tile[k] = M[((long)k * OC + oc) * T + t];
                    {prefix}_output(tile, out);
                    for (int p = 0; p < {m}; ++p)
                        for (int q = 0; q < {m}; ++q) {{
                            const int i = th * {m} + p, j = tw * {m} + q;
                            if (i < H && j < W)
                                y[(((long)b * OC + oc) * H + i) * W + j] = out[p * {m} + q];
                        }}
                }}
}}
"""


__all__ = ["transform_functions", "forward_source"]
