"""Time the generated C contraction kernels on VGG's layer shapes.

    python tools/bench_kernels.py                      # kernels from the current templates, width 16 and 64
    python tools/bench_kernels.py --width 16 --torch   # and PyTorch's (oneDNN) conv forward + backward
    python tools/bench_kernels.py --source old.c       # another build of vggen_kernels.c (same signatures)
    python tools/bench_kernels.py --only 512:512:2     # one conv shape IC:OC:H (B from --batch)
    python tools/bench_kernels.py --rounds 3 --quiet 60 --torch --check   # the report's table

Compiled as the C runtime does (cc -O3 -march=native -fopenmp); OMP_NUM_THREADS
as set (the machine's cores by default).  Each kernel runs once to warm up,
then --reps times; the table shows the fastest run (the least disturbed by
other processes) and the median, in ms, and GFLOP/s of the fastest.  Run it
on a quiet machine, one benchmark at a time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vggen.compiler.emit import generate  # noqa: E402
from vggen.frontend.layers import convolution2d, linear  # noqa: E402

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def vgg_convs(c1: int) -> list[tuple[int, int, int]]:
    """(IC, OC, H) of VGG's 13 convolutions at width c1 (32×32 images)."""
    return [(3, c1, 32), (c1, c1, 32), (c1, 2 * c1, 16), (2 * c1, 2 * c1, 16), (2 * c1, 4 * c1, 8),
            (4 * c1, 4 * c1, 8), (4 * c1, 4 * c1, 8), (4 * c1, 8 * c1, 4), (8 * c1, 8 * c1, 4),
            (8 * c1, 8 * c1, 4), (8 * c1, 8 * c1, 2), (8 * c1, 8 * c1, 2), (8 * c1, 8 * c1, 2)]


def compile_kernels(source: str | None, where: Path):
    _, kernels = generate([convolution2d(), linear()], "c")
    if source is None:
        text, _ = generate([convolution2d(), linear()], "c")
        src = where / "kernels.c"
        src.write_text(text)
    else:
        src = Path(source)
    lib = where / "kernels.so"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, *FLAGS, str(src), "-o", str(lib), "-lm"], check=True)
    return ctypes.CDLL(str(lib)), {k.name: k for k in kernels}


def caller(lib, gk, arrays: dict, sizes: dict):
    args = []
    for a in gk.ir.args:
        if a.kind == "size":
            args.append(ctypes.c_int(sizes[a.name]))
        else:
            args.append(arrays[a.name].ctypes.data_as(ctypes.c_void_p))
    fn = getattr(lib, gk.name)
    fn.restype = None
    return lambda: fn(*args)


def _cpu() -> tuple[float, float]:
    """(seconds every CPU was busy, seconds this process was) since boot."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(v) - v[3] - v[4]) / tick, t.user + t.system


QUIET = {"wait": 0.0}      # seconds to wait for other processes to go quiet (--quiet)


def others_busy(dt: float = 0.3) -> float:
    """Fraction of one CPU other processes used over dt seconds."""
    a = _cpu()
    time.sleep(dt)
    b = _cpu()
    return max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / dt


def best(a: tuple, b: tuple | None) -> tuple:
    """Combine two (fastest, median) timings of one kernel from different rounds."""
    return a if b is None else (min(a[0], b[0]), min(a[1], b[1]))


def timed(f, reps: int) -> tuple[float, float]:
    """(fastest, median) seconds of reps runs.  With --quiet, waits until other
    processes leave the CPUs alone and retries runs they disturbed (2-thread
    OpenMP loses whole scheduler ticks at its barriers when they do not)."""
    deadline = time.time() + QUIET["wait"]
    while True:
        while QUIET["wait"] and time.time() < deadline and others_busy() > 0.05:
            pass
        f()
        ts = []
        a = _cpu()
        t0 = time.perf_counter()
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        b = _cpu()
        other = max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / max(1e-9, time.perf_counter() - t0)
        if not QUIET["wait"] or other < 0.05 or time.time() > deadline:
            return min(ts), float(np.median(ts))


def row(label: str, flops: float, t: tuple[float, float]) -> str:
    return f"{label:44s} {t[0] * 1e3:9.3f} {t[1] * 1e3:9.3f} {flops / t[0] / 1e9:8.1f}"


def bench_conv(lib, ks, b, ic, oc, h, reps, use_torch, check, first=False):
    """Time the three conv kernels at one shape (and PyTorch's forward+backward:
    with ``first``, the network's first layer, without the input's gradient)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, ic, h, h), dtype=np.float32)
    w = (rng.standard_normal((oc, ic, 3, 3)) / np.sqrt(9 * ic)).astype(np.float32)
    gy = rng.standard_normal((b, oc, h, h), dtype=np.float32)
    y = np.empty_like(gy)
    gx = np.empty_like(x)
    gw = np.empty_like(w)
    sizes = dict(B=b, IC=ic, OC=oc, H=h, W=h)
    flops = 2.0 * b * h * h * ic * oc * 9
    calls = {"forward_y": caller(lib, ks["convolution2d_forward_y"], dict(w=w, x=x, y=y), sizes),
             "backward_g_x": caller(lib, ks["convolution2d_backward_g_x"], dict(g_y=gy, w=w, g_x=gx), sizes),
             "backward_g_w": caller(lib, ks["convolution2d_backward_g_w"], dict(g_y=gy, x=x, g_w=gw), sizes)}
    out = {}
    for name, f in calls.items():
        out[name] = timed(f, reps)
        print(row(f"conv {ic}->{oc} @{h} {name}", flops, out[name]), flush=True)
    if check or use_torch:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
        xt, wt, gyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_(), torch.from_numpy(gy)
        if check:
            yt = torch.nn.functional.conv2d(xt, wt, padding=1)
            yt.backward(gyt)
            for name, got, want in (("y", y, yt), ("g_x", gx, xt.grad), ("g_w", gw, wt.grad)):
                want = want.detach().numpy()
                err = np.abs(got - want).max() / max(1e-30, np.abs(want).max())
                if err > 1e-4:
                    print(f"    MISMATCH {name}: relative error {err:.2e}")
        if use_torch:
            if first:                                   # the network needs no gradient of the images
                xt = xt.detach()

            def step():
                xt.grad = wt.grad = None
                torch.nn.functional.conv2d(xt, wt, padding=1).backward(gyt)
            t = timed(step, reps)
            print(row(f"conv {ic}->{oc} @{h} torch forward+backward", (2 if first else 3) * flops, t), flush=True)
            out["torch"] = t
    return out


def bench_linear(lib, ks, b, ic, c, reps):
    """Time Linear's three kernels at one shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, ic), dtype=np.float32)
    w = rng.standard_normal((ic, c), dtype=np.float32)
    gy = rng.standard_normal((b, c), dtype=np.float32)
    y, gx, gw = np.empty_like(gy), np.empty_like(x), np.empty_like(w)
    sizes = dict(B=b, IC=ic, C=c)
    flops = 2.0 * b * ic * c
    for name, arrays in (("forward_y", dict(w=w, x=x, y=y)), ("backward_g_x", dict(g_y=gy, w=w, g_x=gx)),
                         ("backward_g_w", dict(g_y=gy, x=x, g_w=gw))):
        t = timed(caller(lib, ks[f"linear_{name}"], arrays, sizes), reps)
        print(row(f"linear {ic}->{c} {name}", flops, t), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help="a vggen_kernels.c to time instead of the current templates' output")
    ap.add_argument("--width", type=int, action="append", help="C1 (default: 16 and 64)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="sweep the conv shapes this many times; the summary keeps each kernel's best")
    ap.add_argument("--only", action="append", help="conv shape IC:OC:H (repeatable)")
    ap.add_argument("--no-linear", action="store_true")
    ap.add_argument("--no-conv", action="store_true", help="Linear's kernels only")
    ap.add_argument("--torch", action="store_true", help="time PyTorch's conv forward+backward too")
    ap.add_argument("--check", action="store_true", help="compare the results with PyTorch's")
    ap.add_argument("--quiet", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds per kernel for other processes to leave the CPUs alone")
    args = ap.parse_args(argv)
    QUIET["wait"] = args.quiet
    with tempfile.TemporaryDirectory() as tmp:
        lib, ks = compile_kernels(args.source, Path(tmp))
        print(f"{'kernel':44s} {'min ms':>9s} {'med ms':>9s} {'GFLOP/s':>8s}")
        if args.only:
            shapes = [tuple(int(v) for v in s.split(":")) for s in args.only]
            for ic, oc, h in shapes:
                bench_conv(lib, ks, args.batch, ic, oc, h, args.reps, args.torch, args.check)
            return 0
        summary = {c1: {} for c1 in args.width or [16, 64]}
        for rnd in range(0 if args.no_conv else args.rounds):
            if args.rounds > 1:
                print(f"round {rnd + 1} of {args.rounds}")
            for c1, seen in summary.items():
                for shape in vgg_convs(c1):
                    if shape in seen and seen[shape]["round"] == rnd:
                        seen[shape]["count"] += 1
                        continue
                    got = bench_conv(lib, ks, args.batch, *shape, args.reps, args.torch, args.check and rnd == 0,
                                     first=shape == vgg_convs(c1)[0])
                    old = seen.get(shape, {})
                    seen[shape] = {k: best(v, old.get(k)) for k, v in got.items()}
                    seen[shape].update(count=1, round=rnd)
        for c1 in summary:
            if not args.no_linear:
                bench_linear(lib, ks, args.batch, 8 * c1, 8 * c1, args.reps)
                bench_linear(lib, ks, args.batch, 8 * c1, 10, args.reps)
        for c1, seen in summary.items():
            if seen:
                print_summary(c1, seen, args.batch)
    return 0


def print_summary(c1: int, seen: dict, batch: int):
    """Per conv shape: the three kernels' fastest ms, their sum, PyTorch's forward+backward."""
    print(f"\nwidth {c1}, B={batch}: ms (fastest run of all rounds); x = times in the network; "
          f"the first layer's g_x is not needed (not in sum)")
    print(f"{'IC->OC @H':16s} {'x':>2s} {'fwd':>8s} {'g_x':>8s} {'g_w':>8s} {'sum':>8s} {'torch':>8s} "
          f"{'torch/sum':>9s}")
    tot = tot_t = 0.0
    for n, ((ic, oc, h), r) in enumerate(seen.items()):
        f, gx, gw = (r[k][0] * 1e3 for k in ("forward_y", "backward_g_x", "backward_g_w"))
        ours = f + gw + (gx if n else 0.0)
        t = r["torch"][0] * 1e3 if "torch" in r else float("nan")
        tot += r["count"] * ours
        tot_t += r["count"] * t
        print(f"{f'{ic}->{oc} @{h}':16s} {r['count']:2d} {f:8.2f} {gx:8.2f} {gw:8.2f} {ours:8.2f} {t:8.2f} "
              f"{t / ours:9.2f}")
    print(f"{'all 13 convs':16s} {'':2s} {'':8s} {'':8s} {'':8s} {tot:8.2f} {tot_t:8.2f} {tot_t / tot:9.2f}")


if __name__ == "__main__":
    sys.exit(main())
