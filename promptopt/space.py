"""Search-space declarations: what a strategy or a backend lets a search tune.

Strategies and backends declare their knobs as data (:class:`Int`, :class:`Float`,
:class:`Choice`); :mod:`promptopt.search` turns each into one Optuna
``trial.suggest_*`` call. Declaring instead of calling keeps Optuna out of every
layer below the search: a strategy never imports the search, and the same
declaration can drive another optimiser.

An upper bound may be :data:`MAX_K`, resolved by the search to the largest number
of prompts a trial may use (``--max-k``, capped by the pool size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

#: placeholder for "the search's largest prompt count" in an :class:`Int` bound
MAX_K = "max_k"


@dataclass(frozen=True)
class Int:
    """An integer knob in [low, high] (``high`` may be :data:`MAX_K`)."""

    name: str
    low: int
    high: int | str
    log: bool = False


@dataclass(frozen=True)
class Float:
    """A real knob in [low, high], sampled on a log scale when ``log``."""

    name: str
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A categorical knob; choices must be None, bool, int, float or str (what Optuna stores)."""

    name: str
    choices: tuple[Any, ...]


Param = Union[Int, Float, Choice]
SearchSpace = tuple[Param, ...]
