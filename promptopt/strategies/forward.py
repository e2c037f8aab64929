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

from pathlib import Path
from typing import Any, Callable, Sequence

from ..artifacts import RunState, fingerprint
from ..data import Sample
from ..errors import BudgetError, ConfigError
from ..memory import format_bytes, parse_bytes
from ..oracle import ValidationOracle
from .base import ProgressFn, PromptStrategy, comparable


class ForwardSelector(PromptStrategy):
    """Greedy forward selection scored by the validation oracle.

    Attributes after ``fit``: ``selected_`` (samples, in the order added),
    ``score_`` (val mIoU of ``selected_``), ``history_`` (one dict per step:
    every candidate's val mIoU, the chosen id, its score and gain, the memory
    estimate, whether it was kept), ``stop_reason_``, ``memory_bytes_`` (the
    estimate for ``selected_``) and ``budget_bytes_``.
    """

    name = "forward"

    def __init__(
        self,
        oracle: ValidationOracle,
        memory_budget: str | int | None = None,
        max_prompts: int | None = None,
        min_gain: float = 0.0,
        patience: int = 1,
        shortlist: int | None = None,
        checkpoint: str | Path | None = None,
        progress: ProgressFn | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(oracle, progress)
        #: called with each finished step's history entry (e.g. to report intermediate values to Optuna)
        self.on_step = on_step
        if max_prompts is not None and max_prompts < 1:
            raise ConfigError(f"max_prompts must be at least 1, got {max_prompts}")
        if patience < 1:
            raise ConfigError(f"patience must be at least 1, got {patience}")
        if shortlist is not None and shortlist < 1:
            raise ConfigError(f"shortlist must be at least 1, got {shortlist}")
        self.memory_budget = memory_budget
        self.max_prompts = max_prompts
        self.min_gain = float(min_gain)
        self.patience = int(patience)
        self.shortlist = shortlist
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None

    # the largest validation image sets the memory estimate: it is the one that must fit
    def _image_size(self) -> tuple[int, int]:
        return max((s.size for s in self.oracle.samples), key=lambda hw: hw[0] * hw[1])

    def _memory(self, k: int) -> int:
        return int(self.oracle.backend.memory_bytes(k, self._image_size()))

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
            chunk = max(1, len(candidates) // 8)  # a few chunks, so progress bars move within a step
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
        self.budget_bytes_ = parse_bytes(self.memory_budget)
        if self.budget_bytes_ is not None:
            need = self._memory(1)
            if need > self.budget_bytes_:
                raise BudgetError(
                    f"memory budget {format_bytes(self.budget_bytes_)} is too small for one prompt: backend "
                    f"{self.oracle.backend.name!r} needs about {format_bytes(need)} for one prompt at image size "
                    f"{self._image_size()[1]}x{self._image_size()[0]}"
                )
        state = RunState(self.checkpoint.parent, self._fingerprint(pool), self.checkpoint.name) if self.checkpoint else None
        saved = state.load() if state else None
        history: list[dict[str, Any]] = list(saved["history"]) if saved else []
        chosen: list[Sample] = [by_id[i] for i in (saved["chosen"] if saved else [])]
        self.resumed_steps_ = len(history)
        best_len = saved["best_len"] if saved else 0
        best_score = saved["best_score"] if saved and saved["best_score"] is not None else float("-inf")
        stale = saved["stale"] if saved else 0
        stop = saved.get("stop_reason") if saved else None
        limit = min(self.max_prompts or len(pool), len(pool))

        while stop is None:
            if len(chosen) >= limit:
                stop = "max_prompts" if self.max_prompts and len(chosen) >= self.max_prompts else "pool_exhausted"
                break
            mem_next = self._memory(len(chosen) + 1)
            if self.budget_bytes_ is not None and mem_next > self.budget_bytes_:
                stop = "memory_budget"
                break
            candidates = [s for s in pool if s not in chosen]
            self._tick("step", len(chosen), limit)
            scores = self._score_step(chosen, candidates)
            pick = max(candidates, key=lambda c: comparable(scores[c.id]))  # ties: first in pool order
            score = scores[pick.id]
            first = not history
            gain = comparable(score) - (0.0 if first else comparable(best_score))
            chosen.append(pick)
            accepted = first or (gain > 0 and gain >= self.min_gain)
            if accepted:
                best_len, best_score, stale = len(chosen), score, 0
            else:
                stale += 1
            history.append({
                "step": len(history) + 1, "chosen": pick.id, "score": score, "gain": gain,
                "accepted": bool(accepted), "memory_bytes": mem_next, "candidates": scores,
            })
            if stale >= self.patience:
                stop = "no_gain"
            if state:
                state.save({"chosen": [c.id for c in chosen], "history": history, "best_len": best_len,
                            "best_score": best_score, "stale": stale, "stop_reason": stop})
            if self.on_step:
                self.on_step(history[-1])
        self._tick("step", limit, limit)
        self.selected_ = chosen[:best_len]
        self.score_ = float(best_score)
        self.history_ = history
        self.stop_reason_ = stop
        self.memory_bytes_ = self._memory(len(self.selected_))
        if state:
            state.save({"chosen": [c.id for c in chosen], "history": history, "best_len": best_len,
                        "best_score": best_score, "stale": stale, "stop_reason": stop})
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "stop_reason": self.stop_reason_, "steps": len(self.history_),
                "memory_bytes": self.memory_bytes_, "budget_bytes": self.budget_bytes_}
