"""Exceptions users see.

Every error a user can cause with bad input (files, ids, options) is a
:class:`PromptOptError` with a message that names the thing at fault, so the
CLI can print it as one line instead of a traceback from deep inside torch.
"""

from __future__ import annotations


class PromptOptError(Exception):
    """Base class of all user-facing errors of promptopt."""


class DataError(PromptOptError):
    """A dataset on disk is missing, empty, unreadable or inconsistent."""


class ConfigError(PromptOptError):
    """An option, id or name given by the user does not exist or does not fit."""


class CheckpointError(PromptOptError):
    """A model checkpoint could not be found or loaded."""


class BudgetError(PromptOptError):
    """A memory budget is malformed or too small for even one prompt."""
