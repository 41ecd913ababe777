"""User-facing errors.

Anything the user can fix (a bad recipe key, a factor file for another model, a corpus with no long
document) raises a `LongRopeError` subclass whose message is one line: what was wrong and what to do.
The CLI prints it without a traceback and exits with status 2; every other exception is a bug.
"""

from __future__ import annotations


class LongRopeError(Exception):
    """Base class for errors caused by user input; the message is shown as-is, on one line."""

    exit_code = 2


class RecipeError(LongRopeError):
    """A recipe file, override or flag is invalid."""


class FactorFileError(LongRopeError):
    """A factor file is unreadable or does not fit the model / target."""


class ModelError(LongRopeError):
    """A model cannot be loaded or its rotary embedding cannot be replaced."""


class DataError(LongRopeError):
    """A corpus is missing, empty, unreadable or too short."""
