"""Reference execution of the Winograd convolution in numpy: transform, a batched
matrix product over channels per transform position, inverse transform.

The shape of the computation is the one the C and CUDA kernels are to take:
for F(m×m, 3×3) with n = m + 2, the padded input is cut into overlapping n×n
tiles at stride m; each tile and each filter are transformed (V = Bᵀ d B,
U = G g Gᵀ); at each of the n² positions (ξ, ν) one matrix product
M[ξ,ν] = U[ξ,ν] (OC × IC) · V[ξ,ν] (IC × tiles) does all the channel sums;
Y = Aᵀ M A per tile, cropped to H × W.  Nothing here is fast; it fixes the
layout and the numerics, and is what the measured float32 errors come from
(``python -m vggen.runtime.winograd``).

Stride 1, zero padding 1, 3×3 filters, NCHW, as eq. 1.
"""

from __future__ import annotations

import numpy as np

from vggen.derive.winograd import WinogradTransforms, forward_transforms, weight_gradient_transforms


def _as_array(M, dtype) -> np.ndarray:
    return np.array([[float(v) for v in row] for row in M.tolist()], dtype=dtype)


def _tiles(x: np.ndarray, tiles_h: int, tiles_w: int, m: int, n: int) -> np.ndarray:
    """(B, C, tiles_h, tiles_w, n, n): overlapping n×n tiles at stride m of x
    padded by one zero row/column before and enough after."""
    b, c, h, w = x.shape
    padded = np.zeros((b, c, tiles_h * m + n - m, tiles_w * m + n - m), dtype=x.dtype)
    padded[:, :, 1:h + 1, 1:w + 1] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, (n, n), axis=(2, 3))
    return windows[:, :, ::m, ::m][:, :, :tiles_h, :tiles_w]


def _matrices(t: WinogradTransforms, dtype):
    return _as_array(t.AT, dtype), _as_array(t.G, dtype), _as_array(t.BT, dtype)


def _setup(x: np.ndarray, t: WinogradTransforms, tile: int):
    """The tile size, n, x's dtype, the matrices in it, x's shape and the tile counts."""
    h, wd = x.shape[2:]
    return tile, t.n, x.dtype, _matrices(t, x.dtype), x.shape, (-(-h // tile), -(-wd // tile))


def winograd_conv2d(x: np.ndarray, w: np.ndarray, m: int = 2, transforms: WinogradTransforms | None = None):
    """y(b, oc, i, j) = Σ_{ic, di, dj} w(oc, ic, di, dj) x(b, ic, i+di−1, j+dj−1) by F(m×m, 3×3),
    in x's dtype throughout (transforms rounded to it)."""
    t = transforms or forward_transforms(m)
    m, n, dtype, (AT, G, BT), (bsz, _, h, wd), (th, tw) = _setup(x, t, t.m)
    oc = w.shape[0]
    d = _tiles(x, th, tw, m, n)                                         # B, IC, th, tw, n, n
    V = np.einsum("xu,bcstuv,yv->xybcst", BT, d, BT, optimize=True)     # n, n, IC, B, th, tw after reshape
    V = V.reshape(n, n, bsz, x.shape[1], th * tw).transpose(0, 1, 3, 2, 4).reshape(n, n, x.shape[1], -1)
    U = np.einsum("xk,ockl,yl->xyoc", G, w.astype(dtype), G, optimize=True)   # n, n, OC, IC
    M = np.matmul(U, V)                                                 # n, n, OC, B·th·tw
    M = M.reshape(n, n, oc, bsz, th, tw)
    Y = np.einsum("ix,xyobst,jy->bositj", AT, M, AT, optimize=True)     # B, OC, th, m, tw, m
    return Y.reshape(bsz, oc, th * m, tw * m)[:, :, :h, :wd]


def winograd_conv2d_input_gradient(gy: np.ndarray, w: np.ndarray, m: int = 2,
                                   transforms: WinogradTransforms | None = None):
    """∂L/∂x: the 3×3 correlation of ∂L/∂y with w turned by 180° and its channels
    swapped (the form `vggen check` proves), by the forward's algorithm."""
    return winograd_conv2d(gy, np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)), m, transforms)


def winograd_conv2d_weight_gradient(x: np.ndarray, gy: np.ndarray, m: int = 2,
                                    transforms: WinogradTransforms | None = None):
    """∂L/∂w(oc, ic, di, dj) = Σ_{b,i,j} gy(b, oc, i, j) x(b, ic, i+di−1, j+dj−1) by
    F(3×3, m×m): each m×m tile of gy is the filter, the (m+2)×(m+2) x tile under
    it the data, and the matrix product sums over batch and tiles."""
    t = transforms or weight_gradient_transforms(m)
    m, n, dtype, (AT, G, BT), (bsz, ic, h, wd), (th, tw) = _setup(x, t, t.r)
    oc = gy.shape[1]
    padded = np.zeros((bsz, oc, th * m, tw * m), dtype=dtype)
    padded[:, :, :h, :wd] = gy
    g = padded.reshape(bsz, oc, th, m, tw, m)
    U = np.einsum("xk,boskul,yl->xyobsu", G, g, G, optimize=True).reshape(n, n, oc, -1)
    d = _tiles(x, th, tw, m, n)
    V = np.einsum("xu,bcstuv,yv->xycbst", BT, d, BT, optimize=True).reshape(n, n, ic, -1)
    M = np.matmul(U, V.transpose(0, 1, 3, 2))                           # n, n, OC, IC
    return np.einsum("ix,xyoc,jy->ocij", AT, M, AT, optimize=True)


def direct_conv2d(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Eq. 1 directly, in x's dtype: nine shifted channel contractions."""
    h, wd = x.shape[2:]
    padded = np.zeros(x.shape[:2] + (h + 2, wd + 2), dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    return sum(np.einsum("bchw,oc->bohw", padded[:, :, di:di + h, dj:dj + wd], w[:, :, di, dj].astype(x.dtype),
                         optimize=True) for di in range(3) for dj in range(3))


def direct_conv2d_weight_gradient(x: np.ndarray, gy: np.ndarray) -> np.ndarray:
    h, wd = x.shape[2:]
    padded = np.zeros(x.shape[:2] + (h + 2, wd + 2), dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    out = np.empty((gy.shape[1], x.shape[1], 3, 3), dtype=x.dtype)
    for di in range(3):
        for dj in range(3):
            out[:, :, di, dj] = np.einsum("bohw,bchw->oc", gy, padded[:, :, di:di + h, dj:dj + wd], optimize=True)
    return out


# The network's 3×3 convolutions at --width 64 on 32×32 inputs (one of each size).
NETWORK_SHAPES = [(32, 64, 64), (16, 128, 128), (8, 256, 256), (4, 512, 512), (2, 512, 512)]


def float32_errors(batch: int = 8, seed: int = 0, shapes=NETWORK_SHAPES, algorithms=None) -> list[dict]:
    """max |y₃₂ − y₆₄| / max |y₆₄| per shape, direction and algorithm, y₆₄ the
    float64 direct convolution."""
    from vggen.derive.winograd import POINTS_INTEGER_4, toom_cook

    algorithms = algorithms or {"F(2×2, 3×3)": (forward_transforms(2), weight_gradient_transforms(2)),
                                "F(4×4, 3×3)": (forward_transforms(4), weight_gradient_transforms(4)),
                                "F(4×4, 3×3) 0,±1,±2": (toom_cook(4, 3, POINTS_INTEGER_4),
                                                         toom_cook(3, 4, POINTS_INTEGER_4))}
    rng = np.random.default_rng(seed)
    rows = []
    for size, cin, cout in shapes:
        x = rng.uniform(-1, 1, (batch, cin, size, size))
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))
        gy = rng.uniform(-1, 1, (batch, cout, size, size))
        wt = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        ref = {"forward": direct_conv2d(x, w), "∂L/∂x": direct_conv2d(gy, wt),
               "∂L/∂w": direct_conv2d_weight_gradient(x, gy)}
        x32, w32, gy32 = (a.astype(np.float32) for a in (x, w, gy))
        runs = {"direct": {"forward": direct_conv2d(x32, w32),
                           "∂L/∂x": direct_conv2d(gy32, wt.astype(np.float32)),
                           "∂L/∂w": direct_conv2d_weight_gradient(x32, gy32)}}
        for name, (tf, tw) in algorithms.items():
            runs[name] = {"forward": winograd_conv2d(x32, w32, transforms=tf),
                          "∂L/∂x": winograd_conv2d_input_gradient(gy32, w32, transforms=tf),
                          "∂L/∂w": winograd_conv2d_weight_gradient(x32, gy32, transforms=tw)}
        for name, outs in runs.items():
            for direction, y in outs.items():
                r = ref[direction]
                rows.append({"shape": f"{size}×{size}, {cin}→{cout}", "algorithm": name, "direction": direction,
                             "error": float(np.max(np.abs(y - r)) / np.max(np.abs(r)))})
    return rows


if __name__ == "__main__":
    results = float32_errors()
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    print("| algorithm | direction | " + " | ".join(shapes) + " |")
    print("|---|---|" + "---|" * len(shapes))
    keys = list(dict.fromkeys((r["algorithm"], r["direction"]) for r in results))
    for alg, direction in keys:
        cells = [next(f"{r['error']:.1e}" for r in results
                      if (r["algorithm"], r["direction"], r["shape"]) == (alg, direction, s)) for s in shapes]
        print(f"| {alg} | {direction} | " + " | ".join(cells) + " |")
