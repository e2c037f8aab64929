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
from typing import Any, Callable, Sequence

from ..data import Sample
from ..errors import ConfigError
from ..oracle import ValidationOracle

ProgressFn = Callable[[str, int, int], None]
"""progress(label, done, total): strategies report steps/candidates through it (the CLI draws bars)."""


def comparable(score: float) -> float:
    """NaN (undefined IoU) sorts below every real score."""
    return -math.inf if score is None or math.isnan(score) else score


class PromptStrategy:
    """Base class: subclasses implement :meth:`fit` and set ``selected_``, ``score_``, ``history_``."""

    name = "strategy"

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

    @property
    def selected_ids_(self) -> list[str]:
        return [s.id for s in self.selected_]  # type: ignore[attr-defined]

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the fitted result."""
        return {"strategy": self.name, "selected": self.selected_ids_, "val_miou": self.score_}  # type: ignore[attr-defined]
