"""Honest baselines for prompt selection (random k, best single, random search, worst-case greedy).

What a baseline needs to be fair: the same pool, the same oracle (same val images,
same metric, same caching — cross-validated or not) and, for search baselines, the
same budget of oracle calls. "Best" means what it means to forward selection: with
a cross-validated oracle, whose sets are scored on slightly different images, sets
are compared paired, on the images both were scored on
(:mod:`promptopt.strategies.acceptance`). The selected sets are then scored on test
by the caller, exactly like the strategy under study.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..data import Sample
from ..errors import ConfigError
from ..oracle import ValidationOracle
from ..space import MAX_K, Choice, Int
from .acceptance import best_index, better
from .base import PromptStrategy, comparable


class RandomK(PromptStrategy):
    """k random pool examples per seed; ``draws_`` holds every seed's set and val score.

    ``selected_``/``score_`` are the first seed's draw (a typical random prompt);
    :meth:`extra_scores` gives the mean and std over all draws on any oracle.
    """

    name = "random"

    def __init__(self, oracle: ValidationOracle, *, k: int = 4, seeds: Sequence[int] | int = 10, **common: Any) -> None:
        super().__init__(oracle, **common)
        if k < 1:
            raise ConfigError(f"random: k must be at least 1, got {k}")
        self.k = int(k)
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        if not self.seeds:
            raise ConfigError("random: at least one seed is needed")

    def fit(self, pool: Sequence[Sample]) -> "RandomK":
        pool = self._check_pool(pool)
        k = min(self.k, len(pool))
        self.require_fit(k)
        self.draws_ = []
        for i, seed in enumerate(self.seeds):
            self._tick("draw", i, len(self.seeds))
            idx = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
            self.draws_.append([pool[j] for j in sorted(idx)])
        self._tick("draw", len(self.seeds), len(self.seeds))
        scores = [self.oracle.score(d).miou for d in self.draws_]
        self.selected_ = self.draws_[0]
        self.score_ = float(scores[0])
        self.history_ = [{"seed": seed, "selected": [s.id for s in d], "val_miou": sc}
                         for seed, d, sc in zip(self.seeds, self.draws_, scores)]
        self.n_evaluations_ = len(self.seeds)
        return self

    def extra_scores(self, oracle: ValidationOracle) -> dict[str, float]:
        """Mean and std over the seeds' draws."""
        scores = np.array([oracle.score(d).miou for d in self.draws_], dtype=float)
        return {"mean": float(np.nanmean(scores)), "std": float(np.nanstd(scores))}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "k": self.k, "draws": self.history_}


class BestSingle(PromptStrategy):
    """The pool example whose one-shot val mIoU is highest (``history_`` has every example's).

    With a cross-validated oracle: the highest mean paired gain over the other examples.
    """

    name = "best-single"
    search_space = ()

    def fit(self, pool: Sequence[Sample]) -> "BestSingle":
        pool = self._check_pool(pool)
        self.require_fit(1, "one prompt")
        self._tick("candidates", 0, len(pool))
        results = self.oracle.score_additions([], pool)
        self._tick("candidates", len(pool), len(pool))
        scores = {s.id: r.miou for s, r in zip(pool, results)}
        best = pool[best_index(results)]
        self.selected_ = [best]
        self.score_ = float(scores[best.id])
        self.history_ = [{"candidates": scores, "chosen": best.id}]
        self.n_evaluations_ = len(pool)
        return self


class RandomSearch(PromptStrategy):
    """Best of ``n_trials`` random combinations of 1..k pool examples (size drawn uniformly).

    k is capped at the largest set that fits the memory budget. A trial replaces the best so
    far when its paired gain over it is positive (with a holdout oracle: a higher val mIoU).
    """

    name = "random-search"
    searches_sizes = True
    search_space = (Int("k", 1, MAX_K), Choice("n_trials", (10, 30)))

    def __init__(self, oracle: ValidationOracle, *, k: int = 4, n_trials: int = 50, seed: int = 0,
                 **common: Any) -> None:
        super().__init__(oracle, **common)
        if k < 1 or n_trials < 1:
            raise ConfigError(f"random-search: k and n_trials must be at least 1 (got {k}, {n_trials})")
        self.k, self.n_trials, self.seed = int(k), int(n_trials), int(seed)

    def fit(self, pool: Sequence[Sample]) -> "RandomSearch":
        pool = self._check_pool(pool)
        self.require_fit(1, "one prompt")
        rng = np.random.default_rng(self.seed)
        k = self.largest_fitting(min(self.k, len(pool)))
        best, best_result, history = None, None, []
        for t in range(self.n_trials):
            self._tick("trial", t, self.n_trials)
            size = int(rng.integers(1, k + 1))
            chosen = [pool[j] for j in sorted(rng.choice(len(pool), size=size, replace=False))]
            result = self.oracle.score(chosen)
            history.append({"trial": t, "selected": [s.id for s in chosen], "val_miou": result.miou})
            if better(result, best_result):
                best, best_result = chosen, result
        self._tick("trial", self.n_trials, self.n_trials)
        self.selected_, self.score_, self.history_ = best, float(best_result.miou), history
        self.n_evaluations_ = self.n_trials
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "n_trials": self.n_trials, "k": self.k}


class WorstCaseGreedy(PromptStrategy):
    """Cover the hardest image: best single first, then add whatever most helps the worst val image.

    Ties on the worst image's IoU are broken by overall val mIoU. Stops at
    ``max_prompts`` (capped by the memory budget) or when no candidate improves
    the worst image.
    """

    name = "worst-case"

    def __init__(self, oracle: ValidationOracle, *, max_prompts: int = 4, **common: Any) -> None:
        super().__init__(oracle, **common)
        if max_prompts < 1:
            raise ConfigError(f"worst-case: max_prompts must be at least 1, got {max_prompts}")
        self.max_prompts = int(max_prompts)

    def fit(self, pool: Sequence[Sample]) -> "WorstCaseGreedy":
        pool = self._check_pool(pool)
        first = BestSingle(self.oracle, memory_budget=self.memory_budget).fit(pool)
        chosen = list(first.selected_)
        current = self.oracle.score(chosen)
        evaluations = first.n_evaluations_
        history = [{"step": 1, "chosen": chosen[0].id, "worst_image": None, "val_miou": current.miou}]
        limit = self.largest_fitting(min(self.max_prompts, len(pool)))
        while len(chosen) < limit:
            self._tick("step", len(chosen), limit)
            per_image = current.per_image_iou
            worst = min(per_image, key=lambda i: comparable(per_image[i]))
            candidates = [s for s in pool if s not in chosen]
            results = self.oracle.score_additions(chosen, candidates)
            evaluations += len(candidates)
            pick, res = max(zip(candidates, results), key=lambda cr: (
                comparable(cr[1].per_image_iou.get(worst, float("nan"))), comparable(cr[1].miou)))
            if comparable(res.per_image_iou.get(worst)) <= comparable(per_image[worst]):
                break
            chosen.append(pick)
            current = res
            history.append({"step": len(chosen), "chosen": pick.id, "worst_image": worst, "val_miou": res.miou})
        self.selected_, self.score_, self.history_ = chosen, float(current.miou), history
        self.n_evaluations_ = evaluations
        return self
