import math

import numpy as np
import pytest

from promptopt.metrics import IoUAccumulator, confusion_matrix, iou_from_confusion, summarize


def test_binary_hand_computed():
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    pr = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    # foreground: TP=3, FP=1, FN=1 -> 3/5; background: TP=3, FP=1, FN=1 -> 3/5
    acc = IoUAccumulator(2)
    acc.add(pr, gt, "a")
    r = acc.result()
    assert r.miou == pytest.approx(3 / 5, abs=0)
    assert r.summary["fb_iou"] == pytest.approx(3 / 5, abs=0)
    assert r.per_image_iou == {"a": 3 / 5}


def test_dataset_level_not_mean_of_images():
    acc = IoUAccumulator(2)
    # image 1: big object, perfect (100/100); image 2: tiny object, missed (0/1)
    g1 = np.zeros((10, 20), int); g1[:, :10] = 1
    acc.add(g1.copy(), g1, "big")
    g2 = np.zeros((10, 20), int); g2[0, 0] = 1
    acc.add(np.zeros_like(g2), g2, "tiny")
    r = acc.result()
    assert r.miou == 100 / 101  # sum I / sum U, not (1 + 0) / 2
    assert r.per_image_iou == {"big": 1.0, "tiny": 0.0}


def test_empty_masks_and_all_ignore():
    acc = IoUAccumulator(2)
    empty = np.zeros((4, 4), int)
    acc.add(empty, empty, "empty")  # no foreground anywhere: contributes TN only
    ign = np.full((4, 4), 255)
    acc.add(np.ones((4, 4), int), ign, "ignored")  # all-ignore: contributes nothing
    r = acc.result()
    assert math.isnan(r.miou)  # foreground absent from prediction and truth over the whole set
    assert r.summary["fb_iou"] == 1.0  # background alone
    assert math.isnan(r.per_image_iou["empty"]) and math.isnan(r.per_image_iou["ignored"])
    assert r.confusion.tolist() == [[16, 0], [0, 0]]
    gt = np.array([[1, 0]]); acc.add(np.array([[1, 1]]), gt, "x")
    assert acc.result().miou == 1 / 2


def test_ignore_pixels_do_not_count():
    gt = np.array([[1, 255, 0]])
    pr = np.array([[1, 1, 1]])
    cm = confusion_matrix(pr, gt, 2)
    assert cm.tolist() == [[0, 1], [0, 1]]
    assert iou_from_confusion(cm)[1] == 0.5


def test_multiclass_with_absent_class():
    gt = np.array([[0, 1, 1, 2]])
    pr = np.array([[0, 1, 2, 2]])
    cm = confusion_matrix(pr, gt, 4)  # class 3 absent from both
    s = summarize(cm)
    iou = s["per_class_iou"]
    assert iou[:3] == [1.0, 0.5, 0.5] and math.isnan(iou[3])
    assert s["miou"] == pytest.approx(2 / 3)
    assert s["fg_miou"] == pytest.approx(0.5)


def test_bad_predictions_raise():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([3]), np.array([0]), 2)
    with pytest.raises(ValueError, match="pixels"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
