"""Prompt-selection strategies: they talk to the oracle, never to a concrete backend."""

from .base import PromptStrategy
from .baselines import BestSingle, RandomK, RandomSearch, WorstCaseGreedy
from .forward import ForwardSelector
from .tuning import ContextTuner

SELECTION_STRATEGIES = ("forward", "random", "best-single", "random-search", "worst-case", "retrieval")

__all__ = ["PromptStrategy", "ForwardSelector", "RandomK", "BestSingle", "RandomSearch", "WorstCaseGreedy",
           "ContextTuner", "SELECTION_STRATEGIES"]


def __getattr__(name: str):
    # RetrievalSelector is imported lazily: it needs FAISS, which only retrieval uses
    if name == "RetrievalSelector":
        from .retrieval import RetrievalSelector

        return RetrievalSelector
    raise AttributeError(name)
