"""The contract every strategy keeps, and the checkpoint protocol a run hands to it.

A strategy is configured in ``__init__`` (scikit-learn style: the oracle first,
then keyword knobs), learns in ``fit(pool)`` (which returns ``self``), and
exposes what it learned as attributes ending in ``_``: ``selected_`` (the
chosen pool samples), ``score_`` (their validation mIoU), ``history_`` (what it
tried) and ``n_evaluations_`` (prompt sets it scored — a function of its
history, so a resumed fit reports the same number). It scores only through a
:class:`~promptopt.oracle.ValidationOracle`, never through a backend class, so
any backend can sit behind it; it never imports the search. Its knobs for a
search are declared as data in ``search_space`` (see :mod:`promptopt.space`).

Memory: every strategy takes ``memory_budget`` and never fits a prompt set whose
estimated peak (``backend.memory_bytes``) exceeds it; a budget too small for the
smallest useful set raises :class:`~promptopt.errors.BudgetError` naming the
needed figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch

from ..artifacts import save_prompt
from ..data import Sample
from ..errors import BudgetError, ConfigError
from ..memory import format_bytes, parse_bytes
from ..oracle import OracleResult, ValidationOracle
from ..space import SearchSpace

ProgressFn = Callable[[str, int, int], None]
"""progress(label, done, total): strategies report steps/candidates through it (the CLI draws bars or logs)."""

StepFn = Callable[[int, float], None]
"""on_step(step, val_score): intermediate values (a search reports them to Optuna's pruner)."""


class Checkpoint(Protocol):
    """Where a strategy keeps its progress so that a killed fit resumes exactly (a run provides one).

    ``load`` returns ``(data, blob)`` saved under the same fingerprint, or None;
    ``save`` stores JSON-able ``data`` and an optional torch-serialisable ``blob``
    (tensors, optimizer state) atomically.
    """

    def load(self, fingerprint: str) -> tuple[dict[str, Any], Any] | None: ...

    def save(self, fingerprint: str, data: dict[str, Any], blob: Any = None) -> None: ...


def comparable(score: float | None) -> float:
    """NaN (undefined IoU) and None sort below every real score."""
    return -math.inf if score is None or math.isnan(score) else score


class PromptStrategy:
    """Base class: subclasses implement :meth:`fit` and set ``selected_``, ``score_``, ``history_``,
    ``n_evaluations_``."""

    name: ClassVar[str] = "strategy"
    #: knobs a search may tune; None: the strategy is not offered to the search
    search_space: ClassVar[SearchSpace | None] = None
    #: strategies a run compares this one with (at the same k, and for search baselines the same budget)
    baselines: ClassVar[tuple[str, ...]] = ("random", "best-single", "random-search", "worst-case")
    #: True when every image gets its own prompts (retrieval): ``selected_`` is then the union used
    per_query: ClassVar[bool] = False
    #: as a baseline: searches set sizes up to ``k`` (a run gives it the largest size the strategy scored and
    #: the same number of oracle evaluations) rather than using exactly the chosen k
    searches_sizes: ClassVar[bool] = False
    #: the kind of prompt artifact :meth:`save_prompt` writes (``promptopt predict`` dispatches on it)
    artifact_kind: ClassVar[str] = "fixed"

    def __init__(self, oracle: ValidationOracle, *, memory_budget: str | int | None = None,
                 checkpoint: Checkpoint | None = None, progress: ProgressFn | None = None,
                 on_step: StepFn | None = None) -> None:
        self.oracle = oracle
        self.memory_budget = memory_budget
        self.checkpoint = checkpoint
        self.progress = progress
        self.on_step = on_step
        self.budget_bytes_ = parse_bytes(memory_budget)

    def fit(self, pool: Sequence[Sample]) -> "PromptStrategy":
        raise NotImplementedError

    # --- shared helpers --------------------------------------------------------------------------------
    def _check_pool(self, pool: Sequence[Sample]) -> list[Sample]:
        pool = list(pool)
        if not pool:
            raise ConfigError(f"{self.name}: the prompt pool is empty")
        if getattr(self.oracle, "cross_validate", False):
            return pool  # a cross-validated oracle scores pool images, but never with themselves as prompts
        val_keys = {s.key for s in self.oracle.samples}
        leaked = [s.id for s in pool if s.key in val_keys]
        if leaked:
            raise ConfigError(f"{self.name}: pool examples {leaked[:5]} are also validation images")
        return pool

    def _tick(self, label: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(label, done, total)

    def _report_step(self, step: int, score: float) -> None:
        if self.on_step is not None and score is not None and not math.isnan(score):
            self.on_step(step, float(score))

    def image_size(self) -> tuple[int, int]:
        """The largest scored image (H, W): the one a memory estimate must fit."""
        return max((s.size for s in self.oracle.samples), key=lambda hw: hw[0] * hw[1])

    def memory_for(self, k: int) -> int:
        """Estimated peak (bytes) of predicting one image with ``k`` prompts."""
        return int(self.oracle.backend.memory_bytes(max(1, int(k)), self.image_size(), self.oracle.num_classes))

    def fits(self, k: int) -> bool:
        """Whether ``k`` prompts fit the memory budget (always, without one)."""
        return self.budget_bytes_ is None or self.memory_for(k) <= self.budget_bytes_

    def largest_fitting(self, k: int) -> int:
        """The largest k' <= k whose estimate fits the budget (0 when not even one prompt fits)."""
        while k > 0 and not self.fits(k):
            k -= 1
        return k

    def require_fit(self, k: int, what: str = "") -> None:
        """Raise :class:`BudgetError` naming the needed figure unless ``k`` prompts fit the budget."""
        if not self.fits(k):
            hw = self.image_size()
            raise BudgetError(
                f"memory budget {format_bytes(self.budget_bytes_)} is too small for {what or f'{k} prompt(s)'}: "
                f"backend {self.oracle.backend.name!r} needs about {format_bytes(self.memory_for(k))} "
                f"({self.oracle.backend.memory_kind}) for {k} prompt(s) at image size {hw[1]}x{hw[0]}")

    # --- what a fitted strategy offers -------------------------------------------------------------
    def evaluate(self, oracle: ValidationOracle) -> OracleResult:
        """Score the fitted prompts on another oracle's images (the held-out test split)."""
        return oracle.score(self.selected_)  # type: ignore[attr-defined]

    def prompts_for(self, queries: Sequence[Sample]) -> list[list[Any]]:
        """The prompts each query gets (the same set for all, unless the strategy is per-query)."""
        return [list(self.selected_) for _ in queries]  # type: ignore[attr-defined]

    def predict(self, queries: Sequence[Sample]) -> list[torch.Tensor]:
        """(C, H, W) probabilities of each query under the fitted prompts (for reports and figures)."""
        backend, c = self.oracle.backend, self.oracle.num_classes
        with torch.no_grad():
            return [backend.predict(ps, [q], c)[0] for q, ps in zip(queries, self.prompts_for(queries))]

    def extra_scores(self, oracle: ValidationOracle) -> dict[str, float]:
        """Further named scores on an oracle's images worth reporting (e.g. a tuner's starting point)."""
        return {}

    def prompt_examples(self) -> list[Sample]:
        """The examples a saved prompt carries: the chosen set (a per-query strategy saves every candidate)."""
        return list(self.selected_)  # type: ignore[attr-defined]

    def save_prompt(self, folder: str | Path, *, category: str, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the fitted prompt as ``folder/prompt.json`` (+ copies of its examples, + learned state)."""
        backend, examples = self.oracle.backend, self.prompt_examples()
        return save_prompt(folder, backend.config(), examples, self.oracle.num_classes, category,
                           kind=self.artifact_kind, learned=backend.learned_state([s.key for s in examples]),
                           extra={"strategy": self.name, "val_miou": self.score_,  # type: ignore[attr-defined]
                                  **self.artifact_extra(folder), **dict(extra or {})})

    def artifact_extra(self, folder: str | Path) -> dict[str, Any]:
        """Strategy-specific fields of ``prompt.json``'s ``extra`` (files written beside it included)."""
        return {}

    def figures(self, folder: Path) -> list[tuple[str, str]]:
        """Strategy-specific report figures written into ``folder``: (caption, file name) pairs."""
        return []

    @property
    def selected_ids_(self) -> list[str]:
        return [s.id for s in self.selected_]  # type: ignore[attr-defined]

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the fitted result."""
        return {"strategy": self.name, "selected": self.selected_ids_, "val_miou": self.score_,  # type: ignore[attr-defined]
                "evaluations": self.n_evaluations_}  # type: ignore[attr-defined]
