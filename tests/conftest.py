"""Shared fixtures: the bundled DAVIS sample and builders of small synthetic datasets on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.manual_seed(0)

from promptopt.data import bundled_sample_root  # noqa: E402


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return bundled_sample_root()


def write_pair(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray | Image.Image, ext: str = ".png") -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}{ext}")
    m = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
    m.save(folder / "masks" / f"{stem}.png")


def blob_image(rng: np.random.Generator, size=(48, 64), colour=(220, 40, 40), background=(40, 90, 200)):
    """A noisy background with one coloured ellipse; returns (image, binary mask)."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = background
    img[mask] = colour
    img += rng.normal(0, 12, img.shape)
    return img.clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


@pytest.fixture
def blob_dataset(tmp_path: Path) -> Path:
    """<root>/blob/{images,masks}: 12 synthetic images of a red ellipse on blue, masks 0/255."""
    rng = np.random.default_rng(0)
    root = tmp_path / "blobs"
    for i in range(12):
        img, mask = blob_image(rng)
        write_pair(root / "blob", f"b{i:02d}", img, mask * 255)
    return root
