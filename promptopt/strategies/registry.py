"""The one strategy registry: name → class, and the one way to build a strategy from options.

Classes are registered by ``"module:Class"`` path and imported on first use, so
strategies with optional heavy dependencies (retrieval needs FAISS) cost nothing
until they are asked for. Options are the class's own ``__init__`` keywords;
:func:`make_strategy` checks them against the signature, so a misspelt or
inapplicable option is an error naming the strategy's real options rather than
something silently ignored.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from ..registry import load_entry
from ..oracle import ValidationOracle
from .base import PromptStrategy

_REGISTRY: dict[str, str | type[PromptStrategy]] = {
    "forward": "promptopt.strategies.forward:ForwardSelector",
    "random": "promptopt.strategies.baselines:RandomK",
    "best-single": "promptopt.strategies.baselines:BestSingle",
    "random-search": "promptopt.strategies.baselines:RandomSearch",
    "worst-case": "promptopt.strategies.baselines:WorstCaseGreedy",
    "retrieval": "promptopt.strategies.retrieval:RetrievalSelector",
    "tuned": "promptopt.strategies.tuning:ContextTuner",
    "text": "promptopt.strategies.text:TextPromptSelector",
}

#: options every strategy takes from :class:`PromptStrategy` (the run and the search fill them in)
COMMON_OPTIONS = ("memory_budget", "checkpoint", "progress", "on_step")
#: the same number of prompts under the two names strategies use for it (a fixed k, or a cap)
_K_ALIASES = ("k", "max_prompts")


def register_strategy(name: str, cls: str | type[PromptStrategy]) -> None:
    """Make a strategy available by name (a class or a lazy ``"module:Class"`` path)."""
    _REGISTRY[name] = cls


def available_strategies(searchable: bool = False) -> list[str]:
    """Registered names (only those that declare a search space when ``searchable``)."""
    return [n for n in _REGISTRY if not searchable or strategy_class(n).search_space is not None]


def strategy_class(name: str) -> type[PromptStrategy]:
    """The class registered under ``name`` (imported on first use)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}")
    cls = _REGISTRY[name] = load_entry(_REGISTRY[name], f"strategy {name!r}")
    return cls


def strategy_options(name: str) -> list[str]:
    """The knobs of a strategy (its ``__init__`` keywords, without the common ones)."""
    sig = inspect.signature(strategy_class(name).__init__)
    return [p for p in list(sig.parameters)[2:] if p not in COMMON_OPTIONS
            and sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]


def make_strategy(name: str, oracle: ValidationOracle, *, strict: bool = True, **options: Any) -> PromptStrategy:
    """Build strategy ``name`` on ``oracle`` with ``options`` (None values mean "the default").

    ``k`` and ``max_prompts`` name the same number: a strategy that takes one of
    them receives the other when only that was given. With ``strict``, an option
    the strategy does not take is a :class:`ConfigError`; without, it is dropped
    (a run builds every baseline from one set of options this way).
    """
    cls = strategy_class(name)
    accepted = set(strategy_options(name)) | set(COMMON_OPTIONS)
    opts = {k: v for k, v in options.items() if v is not None}
    for a, b in (_K_ALIASES, _K_ALIASES[::-1]):
        if a in opts and a not in accepted and b in accepted and b not in opts:
            opts[b] = opts.pop(a)
    unknown = sorted(set(opts) - accepted)
    if unknown and strict:
        own = ", ".join(strategy_options(name)) or "none"
        raise ConfigError(f"strategy {name!r} has no option {unknown[0]!r}; its options: {own}")
    return cls(oracle, **{k: v for k, v in opts.items() if k in accepted})
