"""Plots and overlays for reports: each function draws one figure and writes it as a PNG, atomically.

Overlays colour a prediction against the ground truth: green = correct
foreground, red = false positive, blue = missed (false negative); ignored pixels
are grey. Nothing here knows about runs or strategies: callers pass data.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .artifacts import atomic_write_bytes  # noqa: E402
from .data import IGNORE_INDEX, Sample  # noqa: E402

_CLASS_COLOURS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.uint8)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """The one way a figure reaches disk: PNG bytes written atomically, figure closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Image with class colours blended over labelled pixels (class 0 left as is)."""
    out = image.astype(np.float32).copy()
    for c in np.unique(mask):
        if c == 0 or c == IGNORE_INDEX:
            continue
        colour = _CLASS_COLOURS[int(c) % len(_CLASS_COLOURS)] if c < len(_CLASS_COLOURS) else _CLASS_COLOURS[1 + int(c) % 11]
        sel = mask == c
        out[sel] = (1 - alpha) * out[sel] + alpha * colour
    return out.clip(0, 255).astype(np.uint8)


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Prediction vs ground truth: green TP (correct non-background), red FP, blue FN, grey ignore."""
    out = image.astype(np.float32).copy()
    ignore = truth == IGNORE_INDEX
    tp = (pred == truth) & (truth > 0) & ~ignore
    fp = (pred > 0) & (pred != truth) & ~ignore
    fn = (truth > 0) & (pred != truth) & ~ignore & ~fp
    for sel, colour in ((tp, (40, 200, 40)), (fp, (230, 30, 30)), (fn, (30, 90, 240)), (ignore, (128, 128, 128))):
        out[sel] = (1 - alpha) * out[sel] + alpha * np.array(colour, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def plot_steps(history: Sequence[dict[str, Any]], path: Path, title: str = "Forward selection",
               ylabel: str = "val mIoU") -> Path:
    """Score of the chosen set after each greedy step (accepted steps filled, rejected hollow), with the noise band.

    A step's band (shaded) runs from the kept set's score on the same images (``score - gain``)
    to that plus the noise the gain had to beat (``noise``): a step is kept when its point
    clears its band. Steps without a ``gain``/``noise`` record (the first) have no band.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    steps = [h["step"] for h in history]
    scores = [h["score"] if h["score"] is not None else np.nan for h in history]
    banded = False
    for h, s in zip(history[1:], scores[1:]):
        gain, noise = h.get("gain"), h.get("noise")
        if gain is None or s != s or not np.isfinite(gain):
            continue
        ref = s - gain
        top = ref + noise if noise is not None else s + abs(gain) + 0.05  # no noise estimate: nothing passes
        ax.fill_between([h["step"] - 0.3, h["step"] + 0.3], [ref, ref], [top, top], color="#ff7f0e", alpha=0.25,
                        lw=0, label=None if banded else "kept set + noise (must be cleared)")
        banded = True
    ax.plot(steps, scores, "-", color="#1f77b4")
    for h, s in zip(history, scores):
        ax.plot(h["step"], s, "o", color="#1f77b4", mfc="#1f77b4" if h.get("accepted", True) else "white")
        ax.annotate(str(h["chosen"]), (h["step"], s), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("number of prompts")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    if banded:
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_strategy_scores(rows: Sequence[dict[str, Any]], path: Path, title: str = "Test mIoU by strategy") -> Path:
    """Bar chart of test (and val) mIoU per strategy; ``std`` draws an error bar (random k over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    test = [r.get("test_miou") if r.get("test_miou") is not None else np.nan for r in rows]
    val = [r.get("val_miou") if r.get("val_miou") is not None else np.nan for r in rows]
    err = [r.get("test_std") or 0.0 for r in rows]
    ax.bar(x - 0.2, val, 0.4, label="val (optimised)", color="#aec7e8")
    ax.bar(x + 0.2, test, 0.4, yerr=err, label="test (held out)", color="#1f77b4", capsize=3)
    for xi, t in zip(x, test):
        if not math.isnan(t):
            ax.text(xi + 0.2, t + 0.01, f"{t:.3f}", ha="center", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    return save_figure(fig, path)


def _panels(rows: Sequence[Sequence[tuple[np.ndarray, str]]], path: Path, title: str = "", fontsize: int = 9) -> Path:
    """A grid of titled images (one list per row, axes off), saved as a PNG."""
    nrows, ncols = max(1, len(rows)), max([1, *(len(r) for r in rows)])
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.3 * nrows), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, (image, caption) in zip(ax_row, row):
            ax.imshow(image)
            ax.set_title(caption, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=fontsize)
    return save_figure(fig, path)


def plot_prompts(samples: Sequence[Sample], path: Path, title: str = "Chosen prompts", max_items: int = 8) -> Path:
    """The prompt images with their masks overlaid."""
    return _panels([[(mask_overlay(s.image, s.mask), s.id) for s in list(samples)[:max_items]]], path, title)


def plot_predictions(samples: Sequence[Sample], labels: Sequence[np.ndarray], path: Path,
                     ious: Sequence[float] | None = None, title: str = "Predictions on test images",
                     max_items: int = 6) -> Path:
    """Error overlays (green TP, red FP, blue FN) of predictions on labelled images."""
    panels = [(error_overlay(s.image, np.asarray(lab), s.mask), s.id if ious is None else f"{s.id}  IoU {ious[i]:.2f}")
              for i, (s, lab) in enumerate(list(zip(samples, labels))[:max_items])]
    return _panels([panels], path, title + "  (green: correct, red: false positive, blue: missed)", fontsize=8)


def plot_worst(samples: Sequence[Sample], per_image: Mapping[str, float | None],
               predict: Callable[[list[Sample]], Sequence[np.ndarray]], path: Path, n: int = 6) -> Path:
    """Error overlays of the ``n`` images with the lowest IoU (unscored ones first), ``predict`` labelling them."""
    def iou(s: Sample) -> float:
        value = per_image.get(s.id)
        return math.nan if value is None else float(value)

    worst = sorted(samples, key=lambda s: -1.0 if math.isnan(iou(s)) else iou(s))[:n]
    return plot_predictions(worst, predict(worst), path, [iou(s) for s in worst])


def plot_curves(curves: dict[str, Sequence[float]], path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Line plot of named curves (loss or score per step)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_contexts(start: Sequence[Sample], tuned: Sequence[Sample], path: Path, max_items: int = 6) -> Path:
    """Per learned context: start and tuned image with mask overlay, and the tuned image alone."""
    return _panels([[(mask_overlay(s0.image, s0.mask), f"{s0.id} (mask overlaid)"),
                     (mask_overlay(s1.image, s1.mask), f"{s1.id} (mask overlaid)"), (s1.image, f"{s1.id} image")]
                    for s0, s1 in list(zip(start, tuned))[:max_items]], path)
