"""``vggen plot``: training curves from the metrics file ``vggen train --metrics`` writes.

The file holds one JSON object per line and epoch, with the keys ``epoch,
train_loss, train_acc, test_loss, test_acc, images_per_s, seconds``
(accuracies are fractions).  ``plot()`` draws loss and accuracy per epoch,
train and test, with matplotlib's Agg renderer (no display needed) and writes
the PNG atomically.  A resumed run appends to the file, going back to the
epoch after its checkpoint's; when an epoch appears more than once, its last
line wins.  Any other step back in the epochs (``1, 1, 2, 2``: two runs
writing one file) is refused as a file that mixes runs.  NaN and infinite
values are left out of the curves (one warning says how many), values too
large for matplotlib's axes are clipped to ±1e300, and a loss spanning three
orders of magnitude or more is drawn on a log scale.  matplotlib is optional:
``pip install 'vggen[plot]'``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

from vggen.atomic import write_atomic
from vggen.errors import VggenError

log = logging.getLogger(__name__)

REQUIRED = ("epoch", "train_loss")
SERIES = ("train_loss", "test_loss", "train_acc", "test_acc", "images_per_s", "seconds")
CURVES = (("loss", 1.0), ("acc", 100.0))  # what is drawn, and its scale (accuracy in %)
MAX_EPOCH = 10 ** 9
# matplotlib's tick arithmetic overflows (a crash, or an empty axis) on a
# range near the largest double; values beyond this are drawn at it.
LIMIT = 1e300
LOG_LIMIT = 1e100   # the largest loss drawn on a log axis


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _float(value) -> float:
    """A JSON number as a float: an integer beyond the double range becomes ±inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf      # copysign would convert it again


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
    last, resumed = None, False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise VggenError(f"{path}, line {n}: not JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError):      # json's limit on digits; deep nesting
            raise VggenError(f"{path}, line {n}: not JSON that can be read (a number too long "
                             "or nesting too deep)") from None
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
        if not _float(epoch).is_integer() or not 0 <= epoch <= MAX_EPOCH:
            raise VggenError(f"{path}, line {n}: epoch must be a whole number from 0 to "
                             f"{MAX_EPOCH:,}, not {_short(epoch)}")
        epoch = int(epoch)
        # A resumed run starts again after its checkpoint (epoch 1 at the
        # earliest, as a fresh run empties the file) and counts up one by one.
        if last is not None and (epoch < 2 if epoch <= last else resumed and epoch != last + 1):
            raise VggenError(f"{path}, line {n}: epoch {epoch} follows epoch {last}: the file "
                             "mixes runs (epochs must increase, but for a resumed run redoing "
                             "the epochs after its checkpoint)")
        resumed = resumed or (last is not None and epoch <= last)
        last = epoch
        rows[epoch] = row
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


def curves(rows: list[dict]) -> tuple[dict, int, int]:
    """The loss and accuracy values to draw, per ``<split>_<what>`` key (None: not
    recorded), NaN where there is nothing to draw; and how many values were
    skipped (NaN, infinite) and clipped (beyond ±LIMIT)."""
    out, skipped, clipped = {}, 0, 0
    for what, scale in CURVES:
        for split in ("train", "test"):
            key = f"{split}_{what}"
            if all(r.get(key) is None for r in rows):
                out[key] = None
                continue
            ys = []
            for r in rows:
                v = math.nan if r.get(key) is None else _float(r[key])
                if not math.isfinite(v):
                    skipped += r.get(key) is not None
                    ys.append(math.nan)
                    continue
                v *= scale
                if not abs(v) <= LIMIT:
                    clipped += 1
                    v = math.copysign(LIMIT, v)
                ys.append(v)
            out[key] = ys
    return out, skipped, clipped


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if abs(value) < 1e9 else f"{value:.3g}"


def render(rows: list[dict], title: str = "") -> bytes:
    """The PNG: loss (left) and accuracy in % (right) per epoch, train and test."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in rows]
    values, _, _ = curves(rows)

    marker = "o" if len(rows) <= 30 else None
    for ax, what, unit in ((fig.add_subplot(1, 2, 1), "loss", "loss"),
                           (fig.add_subplot(1, 2, 2), "acc", "accuracy (%)")):
        drawn = []
        for split, style in (("train", "-"), ("test", "--")):
            ys = values[f"{split}_{what}"]
            if ys is not None:
                ax.plot(epochs, ys, style, marker=marker, label=split)
                drawn += [y for y in ys if math.isfinite(y)]
        # A loss falling from 1e3 to 1e-2, or one that blew up, is flat on a
        # linear axis; a log axis shows it, and it needs values above 0.
        # (Not for values near LIMIT: matplotlib's log transform overflows there.)
        if (what == "loss" and drawn and min(drawn) > 0 and max(drawn) >= 1e3 * min(drawn)
                and max(drawn) <= LOG_LIMIT):
            ax.set_yscale("log")
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
    acc, speed = (_float(last.get(k) or 0) for k in ("test_acc", "images_per_s"))
    if last.get("test_acc") is not None and math.isfinite(100 * acc):
        summary.append(f"test accuracy {_number(100 * acc, 1)}%")
    if last.get("images_per_s") is not None and math.isfinite(speed):
        summary.append(f"{_number(speed, 0)} images/s")
    fig.suptitle(f"{title}: " + ", ".join(summary) if title else ", ".join(summary))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot(metrics: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``metrics`` (a JSON-lines file) into the PNG ``out``; returns its path."""
    # A wrong path is reported before a missing matplotlib: the user may be
    # about to install it only to learn that the file was never there.
    rows = load_metrics(metrics)
    values, skipped, clipped = curves(rows)
    if not any(math.isfinite(y) for ys in values.values() if ys is not None for y in ys):
        raise VggenError(f"{metrics}: nothing to plot: every loss and accuracy value is NaN "
                         f"or infinite ({skipped} values)")
    if skipped or clipped:
        notes = [f"skipped {skipped} NaN or infinite value{'s' * (skipped != 1)}"] if skipped else []
        if clipped:
            notes.append(f"drew {clipped} value{'s' * (clipped != 1)} beyond ±{LIMIT:g} at ±{LIMIT:g}")
        log.warning("%s: %s", metrics, "; ".join(notes))
    _matplotlib()
    out = Path(out)
    write_atomic(out, render(rows, Path(metrics).name if title is None else title))
    return out
