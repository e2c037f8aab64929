"""Prompt strategies: they talk to the oracle, never to a concrete backend, and never to the search.

Find them by name in the registry (:func:`make_strategy`, :func:`available_strategies`);
the classes are importable here too.
"""

from .base import Checkpoint, PromptStrategy
from .baselines import BestSingle, RandomK, RandomSearch, WorstCaseGreedy
from .forward import ForwardSelector
from .registry import available_strategies, make_strategy, register_strategy, strategy_class, strategy_options
from .tuning import ContextTuner

__all__ = ["Checkpoint", "PromptStrategy", "ForwardSelector", "RandomK", "BestSingle", "RandomSearch",
           "WorstCaseGreedy", "ContextTuner", "available_strategies", "make_strategy", "register_strategy",
           "strategy_class", "strategy_options"]


def __getattr__(name: str):
    # RetrievalSelector is imported lazily: it needs FAISS, which only retrieval uses
    if name == "RetrievalSelector":
        from .retrieval import RetrievalSelector

        return RetrievalSelector
    raise AttributeError(name)
