"""A segmentation task: one category of a dataset, split into prompt pool / val / test.

Holds what every command needs before a strategy runs — which samples are
candidates, which are scored, how many classes — and evaluates a prompt set on
both held-out parts with the one oracle implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends.base import Backend
from .data import Dataset, MaskMode, Sample, Split, load_dataset, split_samples
from .errors import ConfigError
from .oracle import ValidationOracle

#: what a selection oracle scores: the validation split, or pool ∪ val cross-validated
ORACLE_MODES = ("holdout", "cv")


@dataclass
class Task:
    """One category, its deterministic split and its number of classes."""

    category: str
    split: Split
    num_classes: int
    data_root: Path | None = None
    split_seed: int = 0

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        category: str | None = None,
        pool: float | int = 0.5,
        val: float | int = 0.25,
        test: float | int | None = None,
        seed: int = 0,
    ) -> "Task":
        cat = dataset.resolve_category(category)
        split = split_samples(dataset.samples(cat), pool=pool, val=val, test=test, seed=seed)
        if not split.val:
            raise ConfigError(f"category {cat!r}: the validation split is empty; give it at least one image")
        return cls(category=cat, split=split, num_classes=dataset.num_classes(cat), data_root=dataset.root, split_seed=seed)

    @classmethod
    def from_folder(cls, root: str | Path, category: str | None = None, mask_mode: MaskMode = "auto",
                    num_classes: int | None = None, images: str | Path | None = None, keep_empty: bool | None = None,
                    **split_kwargs) -> "Task":
        """Load ``root`` (a mask folder or COCO annotations, see :func:`~promptopt.data.load_dataset`) and split it."""
        ds = load_dataset(root, category=category, mask_mode=mask_mode, num_classes=num_classes, images=images,
                          keep_empty=keep_empty)
        return cls.from_dataset(ds, category, **split_kwargs)

    @property
    def pool(self) -> list[Sample]:
        return self.split.pool

    def oracles(self, backend: Backend, cache: bool = True,
                mode: str = "holdout") -> tuple[ValidationOracle, ValidationOracle | None]:
        """(selection oracle, test oracle or None when the test split is empty), sharing the backend.

        ``mode`` says what the selection oracle scores: ``"holdout"`` the validation split;
        ``"cv"`` every labelled image a strategy may use (pool ∪ val), each prompt set on all
        of them but its own prompts (see :mod:`promptopt.oracle`). The test oracle is the same
        in both modes: the test split, never seen during selection.
        """
        if mode not in ORACLE_MODES:
            raise ConfigError(f"oracle mode must be one of {', '.join(ORACLE_MODES)}, got {mode!r}")
        cv = mode == "cv"
        scored = [*self.split.pool, *self.split.val] if cv else self.split.val
        val = ValidationOracle(backend, scored, self.num_classes, cache=cache, cross_validate=cv)
        test = ValidationOracle(backend, self.split.test, self.num_classes, cache=cache) if self.split.test else None
        return val, test

    def draw_prompts(self, k: int, seed: int = 0) -> list[Sample]:
        """k pool examples drawn without replacement with ``seed`` (the ``--shots K`` of the CLI)."""
        if k < 1:
            raise ConfigError(f"--shots must be at least 1, got {k}")
        if k > len(self.pool):
            raise ConfigError(f"--shots {k} exceeds the prompt pool of {len(self.pool)} examples")
        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(len(self.pool), size=k, replace=False))
        return [self.pool[i] for i in idx]

    def describe(self) -> dict:
        return {"category": self.category, "num_classes": self.num_classes, "split_seed": self.split_seed,
                "data_root": str(self.data_root) if self.data_root else None, **{"split": self.split.ids()}}


def evaluate_task(task: Task, backend: Backend, prompts: Sequence[str] | None = None, shots: int | None = None,
                  seed: int = 0) -> dict:
    """Val and test scores (dataset-level and per image) of one prompt set, named by pool ids or drawn (``shots``).

    What ``promptopt evaluate`` prints; a JSON-able dict.
    """
    if (prompts is None) == (shots is None):
        raise ConfigError("give exactly one of --prompts ID,ID,... or --shots K")
    chosen = task.split.find_pool(prompts) if prompts is not None else task.draw_prompts(shots, seed)
    if not chosen:
        raise ConfigError("--prompts names no sample id")
    val, test = task.oracles(backend)
    return {"category": task.category, "backend": backend.config(), "num_classes": task.num_classes,
            "split_seed": task.split_seed, "split": task.split.ids(), "prompts": [s.id for s in chosen],
            "val": val.score(chosen).to_dict(), "test": test.score(chosen).to_dict() if test else None,
            "oracle": {"val": val.stats, "test": test.stats if test else None}}
