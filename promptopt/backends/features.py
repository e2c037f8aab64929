"""The weight-free default segmenter: a fixed filter bank plus a softmax-kernel in-context head.

Why it exists: promptopt must run end to end on a laptop CPU with no model
weights at all, and give honest, non-trivial numbers there. This backend has no
learned parameters; everything is a deterministic function of the prompts.

Per image (computed once by :meth:`FeaturesBackend.prepare` and cached):

* the image is resized so its long side is at most ``max_side`` pixels;
* a multi-scale filter bank in torch, at each Gaussian scale σ in ``scales``:
  CIE-Lab colour smoothed at σ (3), gradient magnitude of smoothed lightness (1),
  difference of Gaussians σ vs 2σ (1), structure-tensor energy and anisotropy
  (2); plus the normalised (x, y) position (2);
* channels are divided by fixed typical magnitudes and multiplied by the group
  weights ``colour`` / ``texture`` / ``position``.

In-context head (Nadaraya–Watson kernel regression): from each prompt, up to
``pixels_per_prompt`` labelled pixels are sampled (class-stratified by
``balance``, deterministic per prompt id and ``seed``); every query pixel q
gets class probabilities

    p(c | q) = Σ_j w_j exp(-|f_q - f_j|² / 2T) y_jc / Σ_j w_j exp(-|f_q - f_j|² / 2T)

over the sampled context pixels j, with T = ``temperature`` and w_j the
inverse sampling rate of j's class raised to ``prior_correction`` (1: the head
sees the prompt's true class proportions; 0: the stratified sample's).

Several prompts pool their pixels. Because the kernel sums decompose, the
pooled prediction equals a merge of per-prompt statistics (per-pixel log-max m
and the numerators rescaled by exp(-m)), merged exactly by log-sum-exp: this
backend combines at the output, and the oracle caches each (prompt, query)
pair. Statistics live at the working resolution; the final probabilities are
resized bilinearly to the query's native size.

Everything is differentiable with respect to the prompt image and mask
(:class:`~promptopt.backends.base.Context` tensors), which context tuning uses.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Sample
from ..errors import ConfigError
from ..space import Choice
from .base import Backend, Context, Prompt, Stats, infer_num_classes
from .cache import TensorLRU

# Typical magnitude (std over natural images) of each channel type, used to put
# channels on a common scale. Measured once on weizmann_horse and DAVIS 2016
# images at max_side=256 (see benchmarks/feature_scales.py); fixed constants so
# that a prediction never depends on which other images were loaded.
# Gradient and structure-tensor magnitudes are scale-normalised (multiplied by σ)
# first, which makes their typical magnitude nearly independent of σ.
_LAB_SCALE = (16.0, 5.7, 9.8)
_GRAD_SCALE = 4.0
_DOG_SCALE = 4.0
_ST_SCALE = 2.6
_ANISO_SCALE = 0.23
_POS_SCALE = 0.29  # std of a uniform variable on [0, 1]
_EXP_FLOOR = -87.0  # exp(-87) ≈ 1.6e-38, the smallest normal float32 order of magnitude


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflect padding."""
    k = _gaussian_kernel(sigma, x.device)
    r = k.numel() // 2
    c = x.shape[1]
    h, w = x.shape[-2:]
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) → CIE-Lab (D65), differentiable everywhere."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(1e-6) ** 2.4, rgb / 12.92)
    m = torch.tensor(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        dtype=rgb.dtype, device=rgb.device,
    )
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = xyz / white
    eps = (6.0 / 29.0) ** 3
    f = torch.where(t > eps, t.clamp_min(eps) ** (1.0 / 3.0), t / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    L = 116.0 * f[:, 1] - 16.0
    a = 500.0 * (f[:, 0] - f[:, 1])
    b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], dim=1)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of (N, 1, H, W), replicate-padded."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return gx, gy


def working_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) after scaling (H, W) so that the long side is at most ``max_side`` (never upscaled)."""
    h, w = size
    s = min(1.0, max_side / max(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


class FeaturesBackend(Backend):
    """Weight-free in-context segmenter (see the module docstring). Combines prompts at the output, exactly."""

    name = "features"
    combines = "output"
    differentiable = True
    search_space = (
        Choice("pixels_per_prompt", (512, 1024, 2048)),
        Choice("temperature", (0.15, 0.25, 0.4)),
        Choice("scales", ("1,2,4,8", "1,2,4", "2,4,8,16")),
    )

    def __init__(
        self,
        max_side: int = 192,
        scales: Sequence[float] | str = (1.0, 2.0, 4.0, 8.0),
        pixels_per_prompt: int = 1024,
        temperature: float = 0.25,
        colour: float = 1.0,
        texture: float = 0.5,
        position: float = 2.0,
        balance: float = 0.5,
        prior_correction: float = 1.0,
        seed: int = 0,
        device: str = "cpu",
        cache_bytes: int = 2 << 30,
        chunk_pixels: int = 4096,
    ) -> None:
        if isinstance(scales, str):  # "1,2,4,8" (how a search stores the choice)
            try:
                scales = [float(x) for x in scales.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"features backend: scales must be numbers, got {scales!r}") from None
        if max_side < 8:
            raise ConfigError(f"features backend: max_side must be >= 8, got {max_side}")
        if not scales or min(scales) <= 0:
            raise ConfigError(f"features backend: scales must be positive, got {scales}")
        if pixels_per_prompt < 1:
            raise ConfigError("features backend: pixels_per_prompt must be >= 1")
        if temperature <= 0:
            raise ConfigError("features backend: temperature must be > 0")
        if not 0.0 <= balance <= 1.0 or not 0.0 <= prior_correction <= 1.0:
            raise ConfigError("features backend: balance and prior_correction must be in [0, 1]")
        self.max_side = int(max_side)
        self.scales = tuple(float(s) for s in scales)
        self.pixels_per_prompt = int(pixels_per_prompt)
        self.temperature = float(temperature)
        self.colour, self.texture, self.position = float(colour), float(texture), float(position)
        self.balance, self.prior_correction = float(balance), float(prior_correction)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.cache_bytes = int(cache_bytes)
        self.chunk_pixels = int(chunk_pixels)
        self._features = TensorLRU(self.cache_bytes)
        self._contexts: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        #: images whose features were computed (a cache miss), for tests and benchmarks
        self.feature_computations = 0

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": None,
            "options": {
                "max_side": self.max_side, "scales": list(self.scales), "pixels_per_prompt": self.pixels_per_prompt,
                "temperature": self.temperature, "colour": self.colour, "texture": self.texture,
                "position": self.position, "balance": self.balance, "prior_correction": self.prior_correction,
                "seed": self.seed,
            },
        }

    @property
    def num_channels(self) -> int:
        return 7 * len(self.scales) + 2

    # --- filter bank ---------------------------------------------------------------------------
    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)

    def compute_features(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) float RGB in [0, 1] → (D, h, w) weighted features at the working resolution."""
        size = working_size(tuple(image.shape[-2:]), self.max_side)
        x = self._resize(image.unsqueeze(0).float(), size)
        lab = rgb_to_lab(x)
        lab_scale = torch.tensor(_LAB_SCALE, device=x.device).view(1, 3, 1, 1)
        light = lab[:, :1]
        chans = []
        for s in self.scales:
            chans.append(self.colour * gaussian_blur(lab, s) / lab_scale)
            ls = gaussian_blur(light, s)
            gx, gy = _gradients(ls)
            chans.append(self.texture * s * torch.sqrt(gx * gx + gy * gy + 1e-6) / _GRAD_SCALE)
            chans.append(self.texture * (ls - gaussian_blur(light, 2 * s)) / _DOG_SCALE)
            jxx, jyy, jxy = gaussian_blur(torch.cat([gx * gx, gy * gy, gx * gy], 1), 2 * s).unbind(1)
            trace = jxx + jyy
            energy = torch.sqrt(trace + 1e-6)
            aniso = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy + 1e-6) / (trace + 1e-3)
            chans.append(self.texture * s * energy.unsqueeze(1) / _ST_SCALE)
            chans.append(self.texture * aniso.unsqueeze(1) / _ANISO_SCALE)
        h, w = size
        ys = torch.linspace(0.0, 1.0, h, device=x.device).view(1, 1, h, 1).expand(1, 1, h, w)
        xs = torch.linspace(0.0, 1.0, w, device=x.device).view(1, 1, 1, w).expand(1, 1, h, w)
        chans.append(self.position * torch.cat([xs, ys], 1) / _POS_SCALE)
        return torch.cat(chans, 1)[0]

    def _sample_image(self, sample: Sample) -> torch.Tensor:
        return torch.from_numpy(sample.image).to(self.device).permute(2, 0, 1).float().div_(255.0)

    def features_of(self, sample: Sample) -> torch.Tensor:
        """Cached features of a labelled/unlabelled sample (computed on first use)."""
        feats = self._features.get(sample.key)
        if feats is None:
            with torch.no_grad():
                feats = self.compute_features(self._sample_image(sample)).contiguous()
            self.feature_computations += 1
            self._features.put(sample.key, feats)
        return feats

    def prepare(self, samples: Sequence[Sample]) -> None:
        for s in samples:
            self.features_of(s)

    def image_embedding(self, sample: Sample) -> torch.Tensor:
        """(D,) mean of the image's feature channels: the ``backend`` encoder's embedding for retrieval."""
        return self.features_of(sample).mean((1, 2))

    def clear_cache(self) -> None:
        self._features.clear()
        self._contexts.clear()

    # --- context pixels --------------------------------------------------------------------------
    def _rng(self, key: str | None) -> np.random.Generator:
        digest = hashlib.sha1(f"{self.seed}:{key}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def sample_pixels(self, labels: np.ndarray, num_classes: int, key: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Class-stratified sample of pixel indices from flat hard labels (-1 = ignore).

        Returns (indices, log_weights). A class with n_c pixels gets
        m_c ≈ P·((1-balance)·n_c/N + balance/K) of the P = pixels_per_prompt
        slots (K = classes present); each sampled pixel carries weight
        (n_c / m_c)^prior_correction, its inverse sampling rate.
        """
        rng = self._rng(key)
        valid = labels >= 0
        n_total = int(valid.sum())
        if n_total == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        present = [c for c in range(num_classes) if (labels == c).any()]
        counts = {c: int((labels == c).sum()) for c in present}
        budget = min(self.pixels_per_prompt, n_total)
        alloc = {
            c: (1 - self.balance) * counts[c] / n_total + self.balance / len(present) for c in present
        }
        idx_parts, w_parts = [], []
        for c in present:
            m_c = max(1, min(counts[c], int(round(budget * alloc[c]))))
            pool = np.flatnonzero(labels == c)
            pick = pool if m_c >= pool.size else np.sort(rng.choice(pool, size=m_c, replace=False))
            idx_parts.append(pick)
            w_parts.append(np.full(pick.size, self.prior_correction * math.log(counts[c] / pick.size), dtype=np.float32))
        return np.concatenate(idx_parts), np.concatenate(w_parts)

    def context_pixels(self, prompt: Prompt, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (M, D), labels (M, C), bias (M,)) of a prompt's sampled pixels.

        ``bias`` folds the -|f_j|²/2T term and the sampling weight into one
        per-pixel additive logit. Cached for labelled samples; recomputed (and
        differentiable) for :class:`Context` prompts.
        """
        cache_key = (prompt.key, num_classes) if isinstance(prompt, Sample) else None
        if cache_key is not None and cache_key in self._contexts:
            self._contexts.move_to_end(cache_key)
            return self._contexts[cache_key]
        if isinstance(prompt, Sample):
            feats = self.features_of(prompt)
            mask = Context.from_sample(prompt, num_classes, self.device).mask
        else:
            if prompt.mask.shape[0] != num_classes:
                raise ConfigError(f"context has {prompt.mask.shape[0]} classes, the task has {num_classes}")
            feats = self.compute_features(prompt.image.to(self.device))
            mask = prompt.mask.to(self.device)
        d, h, w = feats.shape
        small = mask
        if tuple(mask.shape[-2:]) != (h, w):
            small = F.interpolate(mask.unsqueeze(0).float(), size=(h, w), mode="area")[0]
        with torch.no_grad():
            total = small.sum(0)
            hard = torch.where(total > 0.5, small.argmax(0), torch.full_like(total, -1, dtype=torch.long))
        idx, logw = self.sample_pixels(hard.flatten().cpu().numpy(), num_classes, prompt.key)
        idx_t = torch.from_numpy(idx).to(self.device)
        f = feats.flatten(1).t().index_select(0, idx_t)  # (M, D)
        y = small.flatten(1).t().index_select(0, idx_t)  # (M, C)
        y = y / y.sum(1, keepdim=True).clamp_min(1e-6)
        bias = -0.5 * (f * f).sum(1) / self.temperature + torch.from_numpy(logw).to(self.device)
        out = (f.contiguous(), y.contiguous(), bias.contiguous())
        if cache_key is not None:
            self._contexts[cache_key] = out
            while len(self._contexts) > 4096:
                self._contexts.popitem(last=False)
        return out

    # --- the head ----------------------------------------------------------------------------------
    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        """Log-max ``m`` (h, w) and rescaled numerators ``num`` (C, h, w) of one (prompt, query) pair."""
        f_c, y_c, bias = self.context_pixels(prompt, num_classes)
        q = self.features_of(query)
        return self._head(q, f_c, y_c, bias, num_classes)

    def _head(self, q: torch.Tensor, f_c: torch.Tensor, y_c: torch.Tensor, bias: torch.Tensor, num_classes: int) -> Stats:
        d, h, w = q.shape
        if f_c.shape[0] == 0:
            return {
                "m": torch.full((h, w), float("-inf"), device=q.device),
                "num": torch.zeros((num_classes, h, w), device=q.device),
            }
        qf = q.flatten(1).t()  # (Q, D)
        ms, nums = [], []
        for start in range(0, qf.shape[0], self.chunk_pixels):
            logits = torch.addmm(bias, qf[start:start + self.chunk_pixels], f_c.t(), alpha=1.0 / self.temperature)
            m = logits.amax(1, keepdim=True)
            # exp(x) for x < -87 is below float32's smallest normal number (it would add < 1e-37 to a sum whose
            # largest term is 1); clamping there keeps torch on its fast vectorised exp path, ~20x faster on CPU.
            if logits.requires_grad:
                e = torch.exp((logits - m.detach()).clamp_min(_EXP_FLOOR))
            else:  # in place: this loop dominates the cost of the backend
                e = logits.sub_(m).clamp_min_(_EXP_FLOOR).exp_()
            ms.append(m.squeeze(1).detach())  # a stabiliser: the prediction does not depend on it
            nums.append(e @ y_c)
        m = torch.cat(ms).view(h, w)
        num = torch.cat(nums).t().reshape(num_classes, h, w)
        return {"m": m, "num": num}

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        m = torch.maximum(a["m"], b["m"])
        safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        sa = torch.exp(a["m"] - safe)
        sb = torch.exp(b["m"] - safe)
        return {"m": m, "num": a["num"] * sa + b["num"] * sb}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        return self._kernel_probs(stats, query)

    def _kernel_probs(self, stats: Stats, query: Sample) -> torch.Tensor:
        num = stats["num"]
        total = num.sum(0, keepdim=True)
        probs = torch.where(total > 0, num / total.clamp_min(1e-30), torch.full_like(num, 1.0 / num.shape[0]))
        return self._resize(probs.unsqueeze(0), query.size)[0] if tuple(probs.shape[-2:]) != tuple(query.size) else probs

    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Probabilities per query; equal to pooling all prompts' pixels in one softmax (see the docstring).

        The same arithmetic as :meth:`predict_from_pairs`, but each prompt's context pixels are
        built once for all queries: tensor prompts (context tuning) are not cached, and rebuilding
        their features (and autograd graph) per query would dominate a tuning step.
        """
        if not prompts:
            raise ConfigError("a prediction needs at least one prompt")
        k = num_classes or infer_num_classes(prompts)
        parts = [self.context_pixels(p, k) for p in prompts]
        return [self.finalize(self.reduce_stats([self._head(self.features_of(q), *part, k) for part in parts]), q)
                for q in queries]

    def predict_pooled(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None) -> list[torch.Tensor]:
        """Reference implementation: one softmax over the concatenated context pixels of all prompts."""
        k = num_classes or infer_num_classes(prompts)
        parts = [self.context_pixels(p, k) for p in prompts]
        f_c = torch.cat([p[0] for p in parts])
        y_c = torch.cat([p[1] for p in parts])
        bias = torch.cat([p[2] for p in parts])
        return [self._kernel_probs(self._head(self.features_of(q), f_c, y_c, bias, k), q) for q in queries]

    def memory_bytes(self, num_prompts: int, image_size: tuple[int, int] | None = None, num_classes: int = 2) -> int:
        """Analytic estimate (CPU or GPU): features of one query and one prompt being processed, the
        sampled context pixels of every prompt, one logits chunk, the statistics and the output.
        Prompts are processed one at a time, so the growth with ``num_prompts`` is small."""
        H, W = image_size or (self.max_side, self.max_side)
        h, w = working_size((H, W), self.max_side)
        d = self.num_channels
        k = 2
        feats = 4 * d * h * w
        build = 4 * h * w * (3 * 6 + 8)  # filter-bank temporaries while one image's features are built
        ctx = 4 * self.pixels_per_prompt * (d + k + 1)
        chunk = 4 * min(self.chunk_pixels, h * w) * self.pixels_per_prompt * 2
        stats = 4 * (k + 1) * h * w * 3
        out = 4 * k * H * W * 2
        return int(2 * feats + build + num_prompts * ctx + chunk + stats + out)
