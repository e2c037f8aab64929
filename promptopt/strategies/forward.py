"""Forward (greedy) selection of in-context examples under a memory budget.

Start from the empty prompt set; at each step score every remaining pool
example added to the current set, keep the one with the highest validation
mIoU; stop when the best gain over the best set so far is not positive and at
least ``min_gain`` for ``patience`` consecutive steps (the kept set is then the
best prefix; a step with no gain at all never counts as progress), when one more prompt
would not fit the memory budget, or at ``max_prompts``.

Speed without changing the answer comes from the oracle: for backends that
combine prompts at the output, each (candidate, val image) result is computed
once and every greedy step merges cached statistics. For backends that combine
inside the model, every step is exact; ``shortlist=M`` then ranks candidates by
the cheap output-level scores and re-scores only the top M exactly (an
approximation whose loss is measured in benchmarks/bench_forward.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..artifacts import fingerprint
from ..data import Sample
from ..errors import ConfigError
from ..space import MAX_K, Int
from .base import PromptStrategy, comparable


class ForwardSelector(PromptStrategy):
    """Greedy forward selection scored by the validation oracle.

    Attributes after ``fit``: ``selected_`` (samples, in the order added),
    ``score_`` (val mIoU of ``selected_``), ``history_`` (one dict per step:
    every candidate's val mIoU, the chosen id, its score and gain, the memory
    estimate, whether it was kept), ``stop_reason_`` ("max_prompts",
    "pool_exhausted" — fewer examples than ``max_prompts`` —, "memory_budget",
    "no_gain"), ``memory_bytes_`` (the estimate for ``selected_``),
    ``budget_bytes_``, ``n_evaluations_`` and ``resumed_steps_``.
    """

    name = "forward"
    search_space = (Int("max_prompts", 1, MAX_K), Int("patience", 1, 2))

    def __init__(self, oracle, *, max_prompts: int | None = None, min_gain: float = 0.0, patience: int = 1,
                 shortlist: int | None = None, **common: Any) -> None:
        super().__init__(oracle, **common)
        if max_prompts is not None and max_prompts < 1:
            raise ConfigError(f"max_prompts must be at least 1, got {max_prompts}")
        if patience < 1:
            raise ConfigError(f"patience must be at least 1, got {patience}")
        if shortlist is not None and shortlist < 1:
            raise ConfigError(f"shortlist must be at least 1, got {shortlist}")
        self.max_prompts = max_prompts
        self.min_gain = float(min_gain)
        self.patience = int(patience)
        self.shortlist = shortlist

    def _fingerprint(self, pool: Sequence[Sample]) -> str:
        return fingerprint({
            "strategy": self.name, "pool": [s.key for s in pool], "val": [s.key for s in self.oracle.samples],
            "backend": self.oracle.backend.config(), "num_classes": self.oracle.num_classes,
            "budget": self.budget_bytes_, "max_prompts": self.max_prompts, "min_gain": self.min_gain,
            "patience": self.patience, "shortlist": self.shortlist,
        })

    def _score_step(self, selected: list[Sample], candidates: list[Sample]) -> dict[str, float]:
        """Val mIoU of selected + [c] for each candidate (exact, or shortlisted)."""
        oracle = self.oracle
        if self.shortlist is None or oracle.uses_pair_cache or len(candidates) <= self.shortlist:
            scores: dict[str, float] = {}
            # pair-cached scores cost the same in any grouping: a few chunks let progress bars move within a
            # step; a model-combining backend gets the whole step at once, so it can batch sets per model call
            chunk = max(1, len(candidates) // 8) if oracle.uses_pair_cache else len(candidates)
            for i in range(0, len(candidates), chunk):
                part = candidates[i:i + chunk]
                scores.update({c.id: r.miou for c, r in zip(part, oracle.score_additions(selected, part))})
                self._tick("candidates", min(i + chunk, len(candidates)), len(candidates))
            return scores
        approx = oracle.score_additions(selected, candidates, approximate=True)
        ranked = sorted(zip(candidates, approx), key=lambda cr: -comparable(cr[1].miou))
        top = [c for c, _ in ranked[: self.shortlist]]
        exact = oracle.score_additions(selected, top)
        scores = {c.id: float("nan") for c in candidates}
        scores.update({c.id: r.miou for c, r in zip(top, exact)})
        return scores

    def fit(self, pool: Sequence[Sample]) -> "ForwardSelector":
        pool = self._check_pool(pool)
        by_id = {s.id: s for s in pool}
        self.require_fit(1, "one prompt")
        fp = self._fingerprint(pool)
        saved = self.checkpoint.load(fp) if self.checkpoint else None
        state: dict[str, Any] = saved[0] if saved else {
            "chosen": [], "history": [], "best_len": 0, "best_score": None, "stale": 0, "stop_reason": None}
        chosen: list[Sample] = [by_id[i] for i in state["chosen"]]
        history: list[dict[str, Any]] = state["history"]
        self.resumed_steps_ = len(history)
        limit = min(self.max_prompts or len(pool), len(pool))

        while state["stop_reason"] is None:
            if len(chosen) >= limit:
                state["stop_reason"] = "max_prompts" if self.max_prompts and len(chosen) >= self.max_prompts \
                    else "pool_exhausted"
                break
            if not self.fits(len(chosen) + 1):
                state["stop_reason"] = "memory_budget"
                break
            candidates = [s for s in pool if s not in chosen]
            self._tick("step", len(chosen), limit)
            scores = self._score_step(chosen, candidates)
            pick = max(candidates, key=lambda c: comparable(scores[c.id]))  # ties: first in pool order
            score = scores[pick.id]
            first = not history
            gain = comparable(score) - (0.0 if first else comparable(state["best_score"]))
            chosen.append(pick)
            accepted = first or (gain > 0 and gain >= self.min_gain)
            if accepted:
                state.update(best_len=len(chosen), best_score=score, stale=0)
            else:
                state["stale"] += 1
            history.append({
                "step": len(history) + 1, "chosen": pick.id, "score": score, "gain": gain,
                "accepted": bool(accepted), "memory_bytes": self.memory_for(len(chosen)), "candidates": scores,
            })
            if state["stale"] >= self.patience:
                state["stop_reason"] = "no_gain"
            state["chosen"] = [c.id for c in chosen]
            if self.checkpoint:
                self.checkpoint.save(fp, state)
            self._report_step(len(history), score)
        if self.checkpoint and (not saved or saved[0]["stop_reason"] is None):
            self.checkpoint.save(fp, state)
        self._tick("step", limit, limit)
        self.selected_ = chosen[: state["best_len"]]
        self.score_ = float("nan") if state["best_score"] is None else float(state["best_score"])
        self.history_ = history
        self.stop_reason_ = state["stop_reason"]
        self.n_evaluations_ = sum(len(h["candidates"]) for h in history)
        self.memory_bytes_ = self.memory_for(len(self.selected_))
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "stop_reason": self.stop_reason_, "steps": len(self.history_),
                "memory_bytes": self.memory_bytes_, "budget_bytes": self.budget_bytes_}

    def figures(self, folder):
        from ..plots import plot_steps

        if not self.history_:
            return []
        return [("Val mIoU per forward-selection step (hollow: step not kept)",
                 plot_steps(self.history_, folder / "steps.png").name)]
