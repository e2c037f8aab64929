"""Forward (greedy) selection of in-context examples under a memory budget.

Start from the empty prompt set; at each step score every remaining pool
example added to the current set and add the best one (highest validation mIoU;
with a cross-validated oracle, whose candidates are scored on slightly different
images, the highest mean paired gain over the other candidates — see
:mod:`promptopt.strategies.acceptance`). A step is *kept* only if the acceptance
rule says its paired gain over the best set so far is real: positive, at least
``min_gain`` and, with ``rule="se"`` or ``"bootstrap"``, above the per-image
paired noise (by default, ``rule="none"``, any positive paired gain counts: see
``DEFAULT_RULE`` for the measurement behind it). Selection stops after ``patience`` consecutive steps
that are not kept (the answer is then the best kept prefix), when one more
prompt would not fit the memory budget, or at ``max_prompts`` — a cap, not a
target: the rule picks k.

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
from .acceptance import (DEFAULT_RULE, Judgement, StoredResult, confusions_of, confusions_to_json, make_rule, rank,
                         same_images)
from .base import PromptStrategy, comparable


class ForwardSelector(PromptStrategy):
    """Greedy forward selection scored by the validation oracle (see the module docstring).

    Parameters beyond the common ones: ``max_prompts`` (cap on k), ``min_gain``, ``patience``,
    ``shortlist``, ``rule`` ("none", "se" or "bootstrap") and ``noise_z`` (its strictness).

    Attributes after ``fit``: ``selected_`` (samples, in the order added), ``score_``,
    ``history_`` (one dict per step: every candidate's val mIoU, the chosen id, its score, the
    rule's verdict over the best kept set, the memory estimate; with candidates scored on
    different images also each one's ranking value ``advantage``), ``stop_reason_``
    ("max_prompts", "pool_exhausted", "memory_budget", "no_gain"), ``memory_bytes_`` (the
    estimate for ``selected_``), ``budget_bytes_``, ``n_evaluations_``, ``largest_scored_``
    (the largest set it scored) and ``resumed_steps_``.
    """

    name = "forward"
    search_space = (Int("max_prompts", 1, MAX_K), Int("patience", 1, 2))

    def __init__(self, oracle, *, max_prompts: int | None = None, min_gain: float = 0.0, patience: int = 1,
                 shortlist: int | None = None, rule: str = DEFAULT_RULE, noise_z: float = 1.0, **common: Any) -> None:
        super().__init__(oracle, **common)
        for option, value in (("max_prompts", max_prompts), ("patience", patience), ("shortlist", shortlist)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be at least 1, got {value}")
        self.max_prompts = max_prompts
        self.min_gain = float(min_gain)
        self.patience = int(patience)
        self.shortlist = shortlist
        self.rule = make_rule(rule, noise_z, min_gain)

    def _fingerprint(self, pool: Sequence[Sample]) -> str:
        return fingerprint({
            "strategy": self.name, "pool": [s.key for s in pool], "val": [s.key for s in self.oracle.samples],
            "oracle": getattr(self.oracle, "mode", "holdout"),
            "backend": self.oracle.backend.config(), "num_classes": self.oracle.num_classes,
            "budget": self.budget_bytes_, "max_prompts": self.max_prompts, "min_gain": self.min_gain,
            "patience": self.patience, "shortlist": self.shortlist, "rule": self.rule.describe(),
        })

    def _score_step(self, selected: list[Sample], candidates: list[Sample]) -> dict[str, Any]:
        """Oracle result of selected + [c] for each candidate id (None: shortlisted out, never scored exactly)."""
        oracle = self.oracle
        if self.shortlist is None or oracle.uses_pair_cache or len(candidates) <= self.shortlist:
            results: dict[str, Any] = {}
            # pair-cached scores cost the same in any grouping: a few chunks let progress bars move within a
            # step; a model-combining backend gets the whole step at once, so it can batch sets per model call
            chunk = max(1, len(candidates) // 8) if oracle.uses_pair_cache else len(candidates)
            for i in range(0, len(candidates), chunk):
                part = candidates[i:i + chunk]
                results.update({c.id: r for c, r in zip(part, oracle.score_additions(selected, part))})
                self._tick("candidates", min(i + chunk, len(candidates)), len(candidates))
            return results
        approx = oracle.score_additions(selected, candidates, approximate=True)
        ranked = sorted(zip(candidates, approx), key=lambda cr: -comparable(cr[1].miou))
        top = [c for c, _ in ranked[: self.shortlist]]
        exact = oracle.score_additions(selected, top)
        results = {c.id: None for c in candidates}
        results.update({c.id: r for c, r in zip(top, exact)})
        return results

    def _pick(self, candidates: list[Sample], results: dict[str, Any]) -> tuple[Sample, dict[str, float] | None]:
        """The best candidate by :func:`~promptopt.strategies.acceptance.rank` (ties: first in pool order),
        and the ranking values when they are not the scores themselves (paired ranking)."""
        scored = [c for c in candidates if results[c.id] is not None]
        values = rank([results[c.id] for c in scored])
        best = max(range(len(scored)), key=lambda i: values[i])  # ties: first in pool order
        paired = not same_images([results[c.id] for c in scored])
        return scored[best], ({c.id: v for c, v in zip(scored, values)} if paired else None)

    def fit(self, pool: Sequence[Sample]) -> "ForwardSelector":
        pool = self._check_pool(pool)
        by_id = {s.id: s for s in pool}
        self.require_fit(1, "one prompt")
        fp = self._fingerprint(pool)
        saved = self.checkpoint.load(fp) if self.checkpoint else None
        state: dict[str, Any] = saved[0] if saved else {
            "chosen": [], "history": [], "best_len": 0, "best_score": None, "best_confusions": {}, "stale": 0,
            "stop_reason": None}
        chosen: list[Sample] = [by_id[i] for i in state["chosen"]]
        history: list[dict[str, Any]] = state["history"]
        # the best kept set's per-image result, as the checkpoint keeps it: a resumed fit compares with exactly it
        best = StoredResult.from_confusions(state["best_confusions"], state["best_score"]) if state["best_len"] else None
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
            results = self._score_step(chosen, candidates)
            pick, advantage = self._pick(candidates, results)
            result = results[pick.id]
            score = result.miou
            chosen.append(pick)
            # the first prompt is always kept: k >= 1
            verdict = (Judgement(comparable(score), 0.0, len(confusions_of(result)), True) if best is None
                       else self.rule.judge(result, best)).to_dict()
            if verdict["accepted"]:
                best = result
                state.update(best_len=len(chosen), best_score=score, stale=0,
                             best_confusions=confusions_to_json(result))
            else:
                state["stale"] += 1
            history.append({
                "step": len(history) + 1, "chosen": pick.id, "score": score, **verdict,
                "memory_bytes": self.memory_for(len(chosen)),
                "candidates": {cid: (float("nan") if r is None else r.miou) for cid, r in results.items()},
                **({"advantage": advantage} if advantage is not None else {}),
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
        self.largest_scored_ = len(history)
        self.memory_bytes_ = self.memory_for(len(self.selected_))
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "stop_reason": self.stop_reason_, "steps": len(self.history_),
                "memory_bytes": self.memory_bytes_, "budget_bytes": self.budget_bytes_,
                "oracle": getattr(self.oracle, "mode", "holdout"), **self.rule.describe()}

    def figures(self, folder):
        from ..plots import plot_steps

        if not self.history_:
            return []
        what = "cross-validated mIoU" if getattr(self.oracle, "mode", "") == "cv" else "val mIoU"
        return [(f"{what[0].upper()}{what[1:]} per forward-selection step (hollow: step not kept; shaded: the "
                 f"level a step had to pass — the kept set's score on the same images plus the noise, rule "
                 f"{self.rule.kind!r})", plot_steps(self.history_, folder / "steps.png", ylabel=what).name)]

