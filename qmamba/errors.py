"""Error types for mistakes a user can make (bad input files, bad options): the CLI prints them as one line,
without a traceback. Programming errors stay ordinary exceptions."""

from __future__ import annotations


class UserError(Exception):
    """Base class for errors caused by the user's input."""


class ConfigError(UserError, ValueError):
    """A configuration that qmamba cannot run (bad value, unsupported feature)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read: missing/unexpected keys, wrong shapes, bad config, unsafe pickle."""


class TokenIdError(UserError, ValueError):
    """Token ids outside the vocabulary."""
