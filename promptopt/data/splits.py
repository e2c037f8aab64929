"""Deterministic splits of one category into a prompt pool, a validation set and a held-out test set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .samples import Sample


@dataclass(frozen=True)
class Split:
    """A category's samples divided into prompt ``pool``, ``val`` (optimised on) and ``test`` (held out)."""

    pool: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def ids(self) -> dict[str, list[str]]:
        return {"pool": [s.id for s in self.pool], "val": [s.id for s in self.val], "test": [s.id for s in self.test]}

    def find_pool(self, ids: Sequence[str]) -> list[Sample]:
        """Pool samples with the given ids, in that order; an id outside the pool is a clear error."""
        by_id = {s.id: s for s in self.pool}
        out = []
        for i in ids:
            if i not in by_id:
                where = "val" if i in {s.id for s in self.val} else "test" if i in {s.id for s in self.test} else None
                hint = f" (it is in the {where} split)" if where else ""
                raise ConfigError(
                    f"prompt id {i!r} is not in the prompt pool{hint}; pool ids: {', '.join(sorted(by_id)[:20])}"
                    f"{', ...' if len(by_id) > 20 else ''}"
                )
            out.append(by_id[i])
        return out


def _count(spec: float | int | None, n: int, name: str) -> int | None:
    if spec is None:
        return None
    if isinstance(spec, bool) or spec < 0:
        raise ConfigError(f"split size {name}={spec!r} must be a non-negative count or fraction")
    if isinstance(spec, int) or (isinstance(spec, float) and spec.is_integer() and spec > 1):
        return int(spec)
    if spec > 1:
        raise ConfigError(f"split size {name}={spec!r}: fractions must be in [0, 1]")
    return int(math.floor(spec * n + 0.5))


def split_samples(
    samples: Sequence[Sample],
    pool: float | int = 0.5,
    val: float | int = 0.25,
    test: float | int | None = None,
    seed: int = 0,
) -> Split:
    """Split one category deterministically: same samples + same seed = same split.

    Sizes are counts (int) or fractions of the category (float in [0, 1]);
    ``test=None`` takes the rest. Samples are ordered by id before a seeded
    shuffle, so the split does not depend on file-system order. When fractions
    are used, each part gets at least one sample if the category is big enough.
    """
    ordered = sorted(samples, key=lambda s: s.id)
    n = len(ordered)
    if n == 0:
        raise DataError("cannot split an empty category")
    n_pool, n_val, n_test = _count(pool, n, "pool"), _count(val, n, "val"), _count(test, n, "test")
    fractions = not isinstance(pool, int) or not isinstance(val, int)
    if fractions and n >= 3:
        n_pool, n_val = max(n_pool, 1), max(n_val, 1)
        if n_test is None and n - n_pool - n_val < 1 and (test is None or test > 0):
            if n_pool >= n_val and n_pool > 1:
                n_pool -= 1
            else:
                n_val -= 1
    if n_test is None:
        n_test = n - n_pool - n_val
    if n_pool + n_val + n_test > n or n_test < 0:
        raise ConfigError(f"split sizes pool={n_pool}, val={n_val}, test={n_test} exceed the {n} samples of the category")
    if n_pool == 0:
        raise ConfigError(f"the prompt pool is empty (category of {n} samples, pool={pool!r})")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in order]
    part = lambda a, b: sorted(shuffled[a:b], key=lambda s: s.id)  # noqa: E731
    return Split(
        pool=part(0, n_pool),
        val=part(n_pool, n_pool + n_val),
        test=part(n_pool + n_val, n_pool + n_val + n_test),
    )
