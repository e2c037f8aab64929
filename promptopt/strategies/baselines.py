"""Honest baselines for prompt selection, scored by the same oracle as forward selection.

* :class:`RandomK` — k pool examples drawn at random, repeated over seeds (mean and std).
* :class:`BestSingle` — the single pool example with the best val mIoU.
* :class:`RandomSearch` — random combinations (sizes 1..k) tried for a fixed number of
  oracle evaluations (set it to what forward selection used), keep the best.
* :class:`WorstCaseGreedy` — start from the best single example, then repeatedly add the
  example that most improves the currently worst-scored validation image.

What a baseline needs to be fair: the same pool, the same oracle (same val images,
same metric, same caching) and, for search baselines, the same budget of oracle
calls. The selected sets are then scored on test by the caller, exactly like the
strategy under study.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..data import Sample
from ..errors import ConfigError
from ..oracle import ValidationOracle
from .base import ProgressFn, PromptStrategy, comparable


class RandomK(PromptStrategy):
    """k random pool examples per seed; ``draws_`` holds every seed's set and val score.

    ``selected_``/``score_`` are the first seed's draw (a typical random prompt),
    ``score_mean_``/``score_std_`` summarise all draws.
    """

    name = "random"

    def __init__(self, oracle: ValidationOracle, k: int, seeds: Sequence[int] | int = 10,
                 progress: ProgressFn | None = None) -> None:
        super().__init__(oracle, progress)
        if k < 1:
            raise ConfigError(f"random: k must be at least 1, got {k}")
        self.k = int(k)
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        if not self.seeds:
            raise ConfigError("random: at least one seed is needed")

    def fit(self, pool: Sequence[Sample]) -> "RandomK":
        pool = self._check_pool(pool)
        k = min(self.k, len(pool))
        self.draws_ = []
        for i, seed in enumerate(self.seeds):
            self._tick("draw", i, len(self.seeds))
            idx = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
            chosen = [pool[j] for j in sorted(idx)]
            self.draws_.append({"seed": seed, "selected": chosen, "val_miou": self.oracle.score(chosen).miou})
        self._tick("draw", len(self.seeds), len(self.seeds))
        scores = np.array([d["val_miou"] for d in self.draws_], dtype=float)
        self.selected_ = self.draws_[0]["selected"]
        self.score_ = float(self.draws_[0]["val_miou"])
        self.score_mean_ = float(np.nanmean(scores))
        self.score_std_ = float(np.nanstd(scores))
        self.history_ = [{"seed": d["seed"], "selected": [s.id for s in d["selected"]], "val_miou": d["val_miou"]}
                         for d in self.draws_]
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "k": self.k, "val_miou_mean": self.score_mean_, "val_miou_std": self.score_std_,
                "draws": self.history_}


class BestSingle(PromptStrategy):
    """The pool example whose one-shot val mIoU is highest (``history_`` has every example's)."""

    name = "best-single"

    def fit(self, pool: Sequence[Sample]) -> "BestSingle":
        pool = self._check_pool(pool)
        results = self.oracle.score_additions([], pool)
        scores = {s.id: r.miou for s, r in zip(pool, results)}
        best = max(pool, key=lambda s: comparable(scores[s.id]))
        self.selected_ = [best]
        self.score_ = float(scores[best.id])
        self.history_ = [{"candidates": scores, "chosen": best.id}]
        return self


class RandomSearch(PromptStrategy):
    """Best of ``n_trials`` random combinations of 1..k pool examples (size drawn uniformly)."""

    name = "random-search"

    def __init__(self, oracle: ValidationOracle, k: int, n_trials: int, seed: int = 0,
                 progress: ProgressFn | None = None) -> None:
        super().__init__(oracle, progress)
        if k < 1 or n_trials < 1:
            raise ConfigError(f"random-search: k and n_trials must be at least 1 (got {k}, {n_trials})")
        self.k, self.n_trials, self.seed = int(k), int(n_trials), int(seed)

    def fit(self, pool: Sequence[Sample]) -> "RandomSearch":
        pool = self._check_pool(pool)
        rng = np.random.default_rng(self.seed)
        k = min(self.k, len(pool))
        best, best_score, history = None, float("-inf"), []
        for t in range(self.n_trials):
            self._tick("trial", t, self.n_trials)
            size = int(rng.integers(1, k + 1))
            chosen = [pool[j] for j in sorted(rng.choice(len(pool), size=size, replace=False))]
            score = self.oracle.score(chosen).miou
            history.append({"trial": t, "selected": [s.id for s in chosen], "val_miou": score})
            if best is None or comparable(score) > comparable(best_score):
                best, best_score = chosen, score
        self._tick("trial", self.n_trials, self.n_trials)
        self.selected_, self.score_, self.history_ = best, float(best_score), history
        return self


class WorstCaseGreedy(PromptStrategy):
    """Cover the hardest image: best single first, then add whatever most helps the worst val image.

    Ties on the worst image's IoU are broken by overall val mIoU. Stops at
    ``max_prompts`` or when no candidate improves the worst image.
    """

    name = "worst-case"

    def __init__(self, oracle: ValidationOracle, max_prompts: int, progress: ProgressFn | None = None) -> None:
        super().__init__(oracle, progress)
        if max_prompts < 1:
            raise ConfigError(f"worst-case: max_prompts must be at least 1, got {max_prompts}")
        self.max_prompts = int(max_prompts)

    def fit(self, pool: Sequence[Sample]) -> "WorstCaseGreedy":
        pool = self._check_pool(pool)
        first = BestSingle(self.oracle).fit(pool)
        chosen = list(first.selected_)
        current = self.oracle.score(chosen)
        history = [{"step": 1, "chosen": chosen[0].id, "worst_image": None, "val_miou": current.miou}]
        while len(chosen) < min(self.max_prompts, len(pool)):
            self._tick("step", len(chosen), self.max_prompts)
            per_image = current.per_image_iou
            worst = min(per_image, key=lambda i: comparable(per_image[i]))
            candidates = [s for s in pool if s not in chosen]
            results = self.oracle.score_additions(chosen, candidates)
            key = lambda cr: (comparable(cr[1].per_image_iou.get(worst, float("nan"))), comparable(cr[1].miou))  # noqa: E731
            pick, res = max(zip(candidates, results), key=key)
            if comparable(res.per_image_iou.get(worst)) <= comparable(per_image[worst]):
                break
            chosen.append(pick)
            current = res
            history.append({"step": len(chosen), "chosen": pick.id, "worst_image": worst, "val_miou": res.miou})
        self.selected_, self.score_, self.history_ = chosen, float(current.miou), history
        return self
