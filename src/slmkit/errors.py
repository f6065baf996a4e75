"""Errors that slmkit raises on bad input.

Every error carries *what* was wrong and *how* to fix it. The CLI prints
``str(err)`` (one or two lines) and exits with code 2; anything that is not a
:class:`SlmkitError` is an internal failure (exit code 1).
"""

from __future__ import annotations


class SlmkitError(Exception):
    """Bad input from the user: a file, field, flag or value that cannot work."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem if hint is None else f"{problem}\n  hint: {hint}")


class ModelNotFoundError(SlmkitError):
    """A model spec points at nothing: no such path, not cached, unknown hub id."""


class CorruptModelError(SlmkitError):
    """A model file exists but cannot be read (truncated, wrong format)."""


class UnsupportedModelError(SlmkitError):
    """The model loads but slmkit (or transformers) cannot use it for this task."""


class DataError(SlmkitError):
    """A data file is missing, empty or malformed (the message names file and line)."""


class ConfigError(SlmkitError):
    """A configuration value is out of range or of the wrong type."""


class BackendError(SlmkitError):
    """A backend (e.g. an HTTP endpoint) failed after retries, or rejected a request."""


class OutputExistsError(SlmkitError):
    """An ``--output`` holds something slmkit did not write (or is a symbolic link); nothing was touched."""
