"""What every prompt-selection strategy shares.

A strategy is configured in ``__init__`` (scikit-learn style), learns in
``fit(pool)`` (which returns ``self``), and exposes what it learned as
attributes ending in ``_``: ``selected_`` (the chosen pool samples),
``score_`` (their validation mIoU) and ``history_`` (what it tried). It talks
only to a :class:`~promptopt.oracle.ValidationOracle`, never to a backend
class, so any backend can sit behind it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..data import Sample
from ..errors import ConfigError
from ..oracle import OracleResult, ValidationOracle

ProgressFn = Callable[[str, int, int], None]
"""progress(label, done, total): strategies report steps/candidates through it (the CLI draws bars)."""


def comparable(score: float) -> float:
    """NaN (undefined IoU) sorts below every real score."""
    return -math.inf if score is None or math.isnan(score) else score


class PromptStrategy:
    """Base class: subclasses implement :meth:`fit` and set ``selected_``, ``score_``, ``history_``."""

    name = "strategy"
    #: True when every image gets its own prompts (retrieval): ``selected_`` is then the union used
    per_query = False

    def __init__(self, oracle: ValidationOracle, progress: ProgressFn | None = None) -> None:
        self.oracle = oracle
        self.progress = progress

    def fit(self, pool: Sequence[Sample]) -> "PromptStrategy":
        raise NotImplementedError

    def _check_pool(self, pool: Sequence[Sample]) -> list[Sample]:
        pool = list(pool)
        if not pool:
            raise ConfigError(f"{self.name}: the prompt pool is empty")
        val_keys = {s.key for s in self.oracle.samples}
        leaked = [s.id for s in pool if s.key in val_keys]
        if leaked:
            raise ConfigError(f"{self.name}: pool examples {leaked[:5]} are also validation images")
        return pool

    def _tick(self, label: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(label, done, total)

    def evaluate(self, oracle: ValidationOracle) -> OracleResult:
        """Score the fitted prompts on another oracle's images (the held-out test split)."""
        return oracle.score(self.selected_)  # type: ignore[attr-defined]

    def save_prompt(self, run_dir: str | Path, backend_config: Mapping[str, Any], num_classes: int, category: str,
                    extra: Mapping[str, Any] | None = None) -> Path:
        """Write the fitted prompt as ``run_dir/prompt.json`` (a fixed prompt set; per-query strategies override)."""
        from ..artifacts import save_prompt

        return save_prompt(run_dir, dict(backend_config), self.selected_, num_classes, category,  # type: ignore[attr-defined]
                           extra=dict(extra or {}))

    @property
    def selected_ids_(self) -> list[str]:
        return [s.id for s in self.selected_]  # type: ignore[attr-defined]

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the fitted result."""
        return {"strategy": self.name, "selected": self.selected_ids_, "val_miou": self.score_}  # type: ignore[attr-defined]
