"""Backends for tests and benchmarks of strategy mechanics (not registered for users).

:class:`JointFeaturesBackend` stands in for a model-combining backend such as
SegGPT's feature ensemble, on real data and without weights: its prediction
attends jointly over the pixels of all prompts (the `features` head run once
on the concatenated context), declared ``combines = "model"``, while its
output-level statistics average per-prompt probabilities — a cheap proxy that
differs from the joint prediction, exactly the situation in which forward
selection's shortlist mode approximates. It lets benchmarks measure what the
shortlist loses against exact greedy on real images.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import Sample
from .base import Prompt, Stats
from .features import FeaturesBackend


class JointFeaturesBackend(FeaturesBackend):
    """`features` with joint (in-model) prompt combination and an averaged-probability proxy."""

    name = "features-joint"
    combines = "model"

    def predict(self, prompts: Sequence[Prompt], queries: Sequence[Sample], num_classes: int | None = None):
        return self.predict_pooled(prompts, queries, num_classes)

    def pair_stats(self, prompt: Prompt, query: Sample, num_classes: int) -> Stats:
        f_c, y_c, bias = self.context_pixels(prompt, num_classes)
        st = self._head(self.features_of(query), f_c, y_c, bias, num_classes)
        num = st["num"]
        total = num.sum(0, keepdim=True)
        probs = torch.where(total > 0, num / total.clamp_min(1e-30), torch.full_like(num, 1.0 / num.shape[0]))
        return {"sum": probs, "count": torch.ones(())}

    def merge_stats(self, a: Stats, b: Stats) -> Stats:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, stats: Stats, query: Sample) -> torch.Tensor:
        probs = stats["sum"] / stats["count"]
        return self._resize(probs.unsqueeze(0), query.size)[0] if tuple(probs.shape[-2:]) != tuple(query.size) else probs

    def config(self):
        cfg = super().config()
        cfg["name"] = self.name
        return cfg
