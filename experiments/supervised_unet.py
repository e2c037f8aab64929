"""A small U-Net trained from scratch on n labelled images: the supervised side of the comparison.

The blog's question is how many labelled images a model trained from scratch
needs before it beats in-context segmentation with a handful of prompts. This
is that model: a four-level U-Net (16-32-64-128 channels, batch norm), trained
with cross-entropy + Dice, Adam and a cosine schedule, light augmentation
(horizontal flips, random resized crops, colour jitter), on images resized to a
fixed working size; predictions are resized back to the native size and scored
with promptopt's one metric implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptopt.data import IGNORE_INDEX, Sample
from promptopt.metrics import IoUAccumulator


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.down = nn.ModuleList([_block(3, w[0]), _block(w[0], w[1]), _block(w[1], w[2])])
        self.mid = _block(w[2], w[3])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[3], w[2], 2, 2), nn.ConvTranspose2d(w[2], w[1], 2, 2),
                                 nn.ConvTranspose2d(w[1], w[0], 2, 2)])
        self.dec = nn.ModuleList([_block(w[3], w[2]), _block(w[2], w[1]), _block(w[1], w[0])])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for blk in self.down:
            x = blk(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _to_tensors(s: Sample, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(s.image).permute(2, 0, 1).float() / 255.0
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mask = torch.from_numpy(s.mask).long()
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return (img - _MEAN) / _STD, mask


def _augment(img: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = mask.shape
    if rng.random() < 0.5:
        img, mask = img.flip(-1), mask.flip(-1)
    scale = rng.uniform(0.7, 1.0)
    ch, cw = int(h * scale), int(w * scale)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = F.interpolate(img[None, :, y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None, y0:y0 + ch, x0:x0 + cw].float(), size=(h, w), mode="nearest")[0, 0].long()
    img = img * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.2, 0.2))
    return img, mask


@dataclass
class TrainConfig:
    size: tuple[int, int] = (128, 128)
    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    width: int = 16
    seed: int = 0


def train_unet(samples: Sequence[Sample], num_classes: int, cfg: TrainConfig) -> UNet:
    """Train a fresh U-Net on ``samples`` (the n labelled examples)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = [_to_tensors(s, cfg.size) for s in samples]
    model = UNet(num_classes, cfg.width)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / cfg.steps)))
    model.train()
    for _ in range(cfg.steps):
        idx = rng.integers(0, len(data), size=cfg.batch_size)
        batch = [_augment(*data[i], rng) for i in idx]
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        logits = model(x)
        valid = y != IGNORE_INDEX
        ce = F.cross_entropy(logits, torch.where(valid, y, 0), reduction="none")[valid].mean()
        probs = logits.softmax(1)
        onehot = F.one_hot(torch.where(valid, y, 0), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]
        inter = (probs * onehot).sum((0, 2, 3))
        dice = 1 - ((2 * inter + 1) / (probs.mul(valid[:, None]).sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)).mean()
        loss = ce + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate_unet(model: UNet, samples: Sequence[Sample], num_classes: int, size: tuple[int, int]) -> float:
    """Dataset-level mIoU on native-resolution masks (the same metric as the oracle)."""
    acc = IoUAccumulator(num_classes)
    for s in samples:
        x, _ = _to_tensors(s, size)
        logits = model(x[None])
        logits = F.interpolate(logits, size=s.size, mode="bilinear", align_corners=False)[0]
        acc.add(logits.argmax(0), s.mask, s.id)
    return acc.result().miou
