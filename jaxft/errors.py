"""Errors a user can act on.

Library code raises these with one message that says what was wrong, where (file, line, key) and
what to do. The CLI prints them as a single line, without a traceback.
"""

from __future__ import annotations


class JaxftError(Exception):
    """Base class of errors caused by user input (configs, checkpoints, data)."""


class ConfigError(JaxftError, ValueError):
    """A bad configuration key or value."""


class CheckpointError(JaxftError, ValueError):
    """A missing, unsupported or inconsistent model checkpoint."""


class DataError(JaxftError, ValueError):
    """A malformed data file or row."""
