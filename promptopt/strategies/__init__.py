"""Prompt-selection strategies: they talk to the oracle, never to a concrete backend."""

from .base import PromptStrategy
from .baselines import BestSingle, RandomK, RandomSearch, WorstCaseGreedy
from .forward import ForwardSelector
from .tuning import ContextTuner

SELECTION_STRATEGIES = ("forward", "random", "best-single", "random-search", "worst-case")

__all__ = ["PromptStrategy", "ForwardSelector", "RandomK", "BestSingle", "RandomSearch", "WorstCaseGreedy",
           "ContextTuner", "SELECTION_STRATEGIES"]
