"""Segmentation metrics from accumulated confusion matrices — the one metric implementation.

IoU is computed at the dataset level, as in the few-shot segmentation
literature: for each class, the intersections and unions of all evaluated
images are summed first and divided once (Σ I / Σ U), so a tiny object that is
missed weighs as little as its pixel count, and an empty image never divides
by zero.

* Binary tasks (2 classes) report ``miou`` = foreground IoU (the "mIoU" of
  few-shot papers, e.g. on PASCAL-5i / FSS-1000 per class) and ``fb_iou`` = the
  mean of background and foreground IoU.
* Multi-class tasks report ``miou`` = mean IoU over classes (background
  included, as in PASCAL VOC) and ``fg_miou`` = mean over classes 1..K-1.
* A class absent from both the predictions and the ground truth over the
  whole evaluated set has no defined IoU; it is excluded from every mean, and
  its entry in ``per_class_iou`` is NaN. If no class is left (e.g. a binary
  task where neither prediction nor ground truth ever has foreground), the
  mean is NaN.
* Pixels whose ground truth is ``ignore_index`` (255) count nowhere.

Per-image IoU (the same definitions applied to one image) is reported for
reports and worst-case strategies; it is not averaged into ``miou``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .data import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Raises ValueError if shapes differ or a prediction is outside 0..num_classes-1
    (a silently clipped label would give a wrong number).
    """
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
    target = np.asarray(target).astype(np.int64, copy=False).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds a class id outside 0..{num_classes - 1}")
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"ground truth holds class id {int(target.max())} outside 0..{num_classes - 1}")
    return np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN where the class is absent from both prediction and truth.

    ``cm`` may be one (C, C) matrix or a stack (..., C, C); the result is (..., C).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    union = cm.sum(-2) + cm.sum(-1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def miou_from_confusion(cm: np.ndarray) -> np.ndarray | float:
    """The headline ``miou`` of one confusion matrix or of each in a stack (..., C, C).

    Binary: foreground IoU; more classes: the mean over classes with a defined IoU (NaN
    when none is). The one definition behind :func:`summarize`'s ``miou``, vectorised so
    that paired comparisons of many prompt sets (:mod:`promptopt.strategies.acceptance`)
    cost no Python loop per set.
    """
    iou = iou_from_confusion(cm)
    if iou.shape[-1] == 2:
        out = iou[..., 1]
    else:
        defined = ~np.isnan(iou)
        count = defined.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 0, np.where(defined, iou, 0.0).sum(-1) / np.maximum(count, 1), np.nan)
    return float(out) if np.ndim(out) == 0 else out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def summarize(cm: np.ndarray) -> dict[str, float | list[float]]:
    """The headline numbers of a confusion matrix (see the module docstring for definitions)."""
    iou = iou_from_confusion(cm)
    k = cm.shape[0]
    out: dict[str, float | list[float]] = {"per_class_iou": [float(v) for v in iou], "miou": miou_from_confusion(cm)}
    if k == 2:
        out["fb_iou"] = _nanmean(iou)
    else:
        out["fg_miou"] = _nanmean(iou[1:])
    total = cm.sum()
    out["pixel_accuracy"] = float(np.trace(cm) / total) if total else float("nan")
    return out


@dataclass
class SegmentationScore:
    """Dataset-level scores plus per-image IoU, for one prompt set on one image set."""

    num_classes: int
    confusion: np.ndarray
    per_image_iou: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float | list[float]]:
        return summarize(self.confusion)

    @property
    def miou(self) -> float:
        return float(self.summary["miou"])

    @property
    def per_class_iou(self) -> list[float]:
        return list(self.summary["per_class_iou"])

    def to_dict(self) -> dict:
        d = dict(self.summary)
        d["per_image_iou"] = dict(self.per_image_iou)
        return d


class IoUAccumulator:
    """Adds images one at a time; ``result()`` gives dataset-level and per-image IoU."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 2:
            raise ValueError("num_classes must be at least 2")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.per_image: dict[str, float] = {}

    def add(self, pred, target, image_id: str | None = None) -> np.ndarray:
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confusion += cm
        if image_id is not None:
            self.per_image[image_id] = float(summarize(cm)["miou"])
        return cm

    def add_confusion(self, cm: np.ndarray, image_id: str | None = None) -> None:
        self.confusion += cm
        if image_id is not None:
            self.per_image[image_id] = float(summarize(cm)["miou"])

    def result(self) -> SegmentationScore:
        return SegmentationScore(self.num_classes, self.confusion.copy(), dict(self.per_image))


def mean_iou(preds, targets, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Dataset-level mIoU of paired lists of label maps (convenience over :class:`IoUAccumulator`)."""
    acc = IoUAccumulator(num_classes, ignore_index)
    for p, t in zip(preds, targets, strict=True):
        acc.add(p, t)
    return acc.result().miou
