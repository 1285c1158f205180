"""``vggen plot``: training curves from the metrics file ``vggen train --metrics`` writes.

The file holds one JSON object per line and epoch, with the keys ``epoch,
train_loss, train_acc, test_loss, test_acc, images_per_s, seconds``
(accuracies are fractions).  ``plot()`` draws loss and accuracy per epoch,
train and test, with matplotlib's Agg renderer (no display needed) and writes
the PNG atomically.  A resumed run appends to the file; when an epoch appears
more than once, its last line wins.  matplotlib is optional:
``pip install 'vggen[plot]'``.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from vggen.atomic import write_atomic
from vggen.errors import VggenError

REQUIRED = ("epoch", "train_loss")
SERIES = ("train_loss", "test_loss", "train_acc", "test_acc", "images_per_s", "seconds")


def load_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics file, one per epoch in epoch order; a VggenError
    names the file (and the line) when it cannot be read, is empty or is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VggenError(f"{path}: no such metrics file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VggenError(f"{path}: cannot read the metrics file ({getattr(e, 'strerror', None) or e})") from None
    rows: dict[int, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise VggenError(f"{path}, line {n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise VggenError(f"{path}, line {n}: expected a JSON object with {', '.join(REQUIRED)}, "
                             f"found {type(row).__name__}")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise VggenError(f"{path}, line {n}: missing {', '.join(missing)}")
        for key in SERIES + ("epoch",):
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise VggenError(f"{path}, line {n}: {key} must be a number, not {value!r}")
        epoch = row["epoch"]
        if not float(epoch).is_integer() or epoch < 0:
            raise VggenError(f"{path}, line {n}: epoch must be a whole number, not {epoch!r}")
        rows[int(epoch)] = row
    if not rows:
        raise VggenError(f"{path}: the metrics file is empty (no epoch recorded yet)")
    return [rows[e] for e in sorted(rows)]


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise VggenError("plotting needs matplotlib: pip install 'vggen[plot]'") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    return matplotlib, Figure, FigureCanvasAgg


def render(rows: list[dict], title: str = "") -> bytes:
    """The PNG: loss (left) and accuracy in % (right) per epoch, train and test."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in rows]

    def series(key, scale=1.0):
        values = [r.get(key) for r in rows]
        return None if all(v is None for v in values) else \
            [math.nan if v is None else v * scale for v in values]

    marker = "o" if len(rows) <= 30 else None
    for ax, what, scale, unit in ((fig.add_subplot(1, 2, 1), "loss", 1.0, "loss"),
                                  (fig.add_subplot(1, 2, 2), "acc", 100.0, "accuracy (%)")):
        drawn = False
        for split, style in (("train", "-"), ("test", "--")):
            ys = series(f"{split}_{what}", scale)
            if ys is not None:
                ax.plot(epochs, ys, style, marker=marker, label=split)
                drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.set_title(unit.split(" ")[0].capitalize())
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {unit.split(' ')[0]} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
    last = rows[-1]
    summary = [f"epoch {last['epoch']}"]
    if last.get("test_acc") is not None:
        summary.append(f"test accuracy {100 * last['test_acc']:.1f}%")
    if last.get("images_per_s") is not None:
        summary.append(f"{last['images_per_s']:.0f} images/s")
    fig.suptitle(f"{title}: " + ", ".join(summary) if title else ", ".join(summary))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot(metrics: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``metrics`` (a JSON-lines file) into the PNG ``out``; returns its path."""
    # A wrong path is reported before a missing matplotlib: the user may be
    # about to install it only to learn that the file was never there.
    rows = load_metrics(metrics)
    _matplotlib()
    out = Path(out)
    write_atomic(out, render(rows, Path(metrics).name if title is None else title))
    return out
