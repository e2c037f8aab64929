"""The search on top of runs: an Optuna study whose trials are runs of registered strategies.

:mod:`.study` turns declared search spaces into ``trial.suggest_*`` calls and runs the study;
:mod:`.storage` opens where the study lives (journal file, SQLite, PostgreSQL) and
:mod:`.workers` shares one study between processes and machines. Nothing below the search
imports it.
"""

from .storage import open_storage, redact
from .study import SAMPLERS, PromptSearch, check_sampler, make_sampler, params_seed, run_search, score_artifact, suggest
from .workers import SearchError

__all__ = ["PromptSearch", "run_search", "score_artifact", "open_storage", "redact", "suggest", "make_sampler",
           "check_sampler", "params_seed", "SAMPLERS", "SearchError"]
