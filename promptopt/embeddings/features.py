"""The weight-free default encoder: pooled statistics of the ``features`` backend's filter bank.

Why: retrieval must work with no model weights. An image is described by the
mean and standard deviation of each filter-bank channel (Lab colour, gradient,
difference of Gaussians, structure tensor at several scales) over a spatial
pyramid (whole image, then a 2x2 grid). Position channels are dropped: their
statistics are the same for every image. Lightness is centred (L - 50) so that
cosine similarity is not dominated by a large constant component.

Mask-aware embeddings (candidates) weight the object's pixels by 1 and the
background's by ``background_weight``: the vector stays in the query's space,
but a candidate is matched mainly by what its object looks like (cf. PerSAM's
target embedding, features pooled inside the mask).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.features import _LAB_SCALE, FeaturesBackend
from ..data import IGNORE_INDEX, Sample
from ..errors import ConfigError
from .base import Encoder, hash_json

_VERSION = 1  # bump when the statistics change: old indexes must then be rebuilt


class FeatureStatsEncoder(Encoder):
    """Mean + std of filter-bank channels over a spatial pyramid (dim = 2 · channels · Σ level²)."""

    name = "features"

    @classmethod
    def from_spec(cls, arg: str, checkpoint: str | None, options: dict[str, Any]) -> "FeatureStatsEncoder":
        """``features`` (weight-free: no argument, no checkpoint)."""
        if arg or checkpoint:
            raise ConfigError("encoder 'features' is weight-free; drop " + ("--checkpoint" if checkpoint else f"':{arg}'"))
        return cls(**options)

    def __init__(self, max_side: int = 128, scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
                 levels: Sequence[int] = (1, 2), background_weight: float = 0.25) -> None:
        if not levels or min(levels) < 1:
            raise ConfigError(f"features encoder: pyramid levels must be >= 1, got {levels}")
        if not 0.0 <= background_weight <= 1.0:
            raise ConfigError("features encoder: background_weight must be in [0, 1]")
        self.max_side = int(max_side)
        self.scales = tuple(float(s) for s in scales)
        self.levels = tuple(int(x) for x in levels)
        self.background_weight = float(background_weight)
        self._bank = FeaturesBackend(max_side=self.max_side, scales=self.scales, position=0.0)
        self._channels = 7 * len(self.scales)

    def options(self) -> dict[str, Any]:
        return {"max_side": self.max_side, "scales": list(self.scales), "levels": list(self.levels),
                "background_weight": self.background_weight}

    @property
    def dim(self) -> int:
        return 2 * self._channels * sum(n * n for n in self.levels)

    @property
    def fingerprint(self) -> str:
        return hash_json({"encoder": self.name, "version": _VERSION, **self.options()})

    def _feature_map(self, sample: Sample) -> torch.Tensor:
        img = torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(255.0)
        with torch.no_grad():
            f = self._bank.compute_features(img)[: self._channels]
        f = f.clone()
        f[0::7] -= 50.0 / _LAB_SCALE[0]  # centred lightness at every scale (see the module docstring)
        return f

    def _pool(self, f: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
        """Weighted mean and std of (D, h, w) features per pyramid cell → flat vector."""
        parts = []
        w4 = weight[None, None]
        fw = torch.cat([f * weight, f * f * weight])[None]
        for n in self.levels:
            wsum = F.adaptive_avg_pool2d(w4, n)[0].clamp_min(1e-8)  # (1, n, n)
            sums = F.adaptive_avg_pool2d(fw, n)[0] / wsum  # (2D, n, n)
            mean, sq = sums[: f.shape[0]], sums[f.shape[0]:]
            std = (sq - mean * mean).clamp_min(0).sqrt()
            parts += [mean.flatten(), std.flatten()]
        return torch.cat(parts).numpy()

    def _encode_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        out = []
        for s in samples:
            f = self._feature_map(s)
            out.append(self._pool(f, torch.ones(f.shape[1:])))
        return np.stack(out)

    def _encode_masked_batch(self, samples: Sequence[Sample]) -> np.ndarray:
        out = []
        for s in samples:
            f = self._feature_map(s)
            m = np.asarray(s.mask)
            fg = torch.from_numpy(((m > 0) & (m != IGNORE_INDEX)).astype(np.float32))[None, None]
            fg = F.interpolate(fg, size=f.shape[1:], mode="area")[0, 0]
            out.append(self._pool(f, self.background_weight + (1.0 - self.background_weight) * fg))
        return np.stack(out)
