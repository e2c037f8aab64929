"""Predictions people can read: palette PNGs in the dataset's colours, overlays, a CSV with areas, IoU and
the prompts each image got, and file names that two images sharing a stem cannot collide on."""

from __future__ import annotations

import csv
from pathlib import Path

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from promptopt.cli import app

FAST = ["--option", "max_side=48", "--option", "pixels_per_prompt=128"]
PALETTE = [0, 0, 0, 10, 200, 30, 250, 120, 0] + [0] * (768 - 9)


def _three_class_palette_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(10):
        img = np.zeros((40, 48, 3), np.uint8) + np.array([40, 90, 200], np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        r = int(rng.integers(2, 12))
        img[r:r + 12, 4:20], mask[r:r + 12, 4:20] = (220, 40, 40), 1
        img[r + 14:r + 26, 26:44], mask[r + 14:r + 26, 26:44] = (40, 200, 40), 2
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray((img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)).save(root / "images" / f"s{i}.png")
        m = Image.fromarray(mask, mode="P")
        m.putpalette(PALETTE)
        m.save(root / "masks" / f"s{i}.png")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multiclass_masks_keep_the_dataset_palette_with_overlays_csv_and_iou(tmp_path: Path) -> None:
    data = _three_class_palette_dataset(tmp_path / "three")
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["select", "--data", str(data), "--strategy", "best-single", "--no-baselines",
                                 "--out", str(run), "--quiet", "--pool", "4", "--val", "3", "--test", "3", *FAST])
    assert r.exit_code == 0, r.output
    images = tmp_path / "new"
    images.mkdir()
    Image.open(data / "images" / "s9.png").save(images / "s9.png")
    Image.open(data / "images" / "s8.png").convert("RGB").save(images / "s7.jpg")  # two images, one stem
    Image.open(data / "images" / "s7.png").save(images / "s7.png")
    truth = tmp_path / "truth"
    truth.mkdir()
    for i in (9, 7):
        Image.open(data / "masks" / f"s{i}.png").save(truth / f"s{i}.png")
    out = tmp_path / "masks"
    r = CliRunner().invoke(app, ["predict", "--prompt", str(run), "--images", str(images), "--out", str(out),
                                 "--masks", str(truth), "--overlays", "--quiet"])
    assert r.exit_code == 0, r.output
    names = ["s7_jpg.png", "s7_png.png", "s9.png"]
    assert sorted(p.name for p in out.glob("*.png")) == names  # no collision
    png = Image.open(out / "s9.png")
    assert png.mode == "P" and png.getpalette()[:9] == PALETTE[:9]  # the dataset's own colours
    labels = np.asarray(png)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 2).any()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == names
    rows = _rows(out / "predictions.csv")
    assert [(row["image"], row["mask"], row["class"]) for row in rows] == [
        ("s7.jpg", "s7_jpg.png", "1"), ("s7.jpg", "s7_jpg.png", "2"), ("s7.png", "s7_png.png", "1"),
        ("s7.png", "s7_png.png", "2"), ("s9.png", "s9.png", "1"), ("s9.png", "s9.png", "2")]
    by = {(row["image"], row["class"]): row for row in rows}
    assert int(by[("s9.png", "2")]["area"]) == int((labels == 2).sum())
    assert by[("s7.png", "1")]["iou"] == ""  # its stem is shared: no ground truth matches it unambiguously
    truth_labels = np.asarray(Image.open(truth / "s9.png"))
    inter = [((labels == c) & (truth_labels == c)).sum() for c in (0, 1, 2)]
    union = [((labels == c) | (truth_labels == c)).sum() for c in (0, 1, 2)]
    assert float(by[("s9.png", "1")]["iou"]) == pytest.approx(np.mean([i / u for i, u in zip(inter, union)]), abs=1e-6)
    chosen = json.loads((run / "result.json").read_text())["selected"]
    assert all(row["prompts"].split() == chosen for row in rows)


def test_retrieval_predictions_record_the_prompts_each_image_got(sample_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["select", "--data", str(sample_root), "--category", "dog", "--strategy", "retrieval",
                                 "--strategy-option", "encoder=features", "--k", "2", "--no-baselines",
                                 "--out", str(run), "--quiet", *FAST])
    assert r.exit_code == 0, r.output
    out = tmp_path / "masks"
    r = CliRunner().invoke(app, ["predict", "--prompt", str(run), "--images", str(sample_root / "dog" / "images"),
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = _rows(out / "predictions.csv")
    prompts = {row["image"]: row["prompts"].split() for row in rows}
    assert len(prompts) == 20 and all(len(p) == 2 for p in prompts.values())
    assert len({tuple(p) for p in prompts.values()}) > 1  # images got different nearest examples
    pool = set(json.loads((run / "result.json").read_text())["split"]["pool"])
    assert all(set(p) <= pool for p in prompts.values())
