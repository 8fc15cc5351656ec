"""One error hierarchy: every failure a user can fix is a `SparseSSMError` whose message names the
problem and the fix.  The CLI catches `SparseSSMError` in one place and exits with `exit_code`
(2: bad input or usage, 1: the work itself failed)."""

from __future__ import annotations


class SparseSSMError(Exception):
    """Base of the errors a user can act on."""

    exit_code = 1


class ConfigError(SparseSSMError, ValueError):
    """A configuration value or command-line argument is missing, unknown or invalid; the message
    names the key."""

    exit_code = 2


class DataError(SparseSSMError):
    """A data source is missing, unreadable or unreachable; the message says how to fix it."""

    exit_code = 2


class CheckpointError(SparseSSMError):
    """A checkpoint is missing, incomplete, corrupt or unsafe to load."""

    exit_code = 2


class DirectoryLockedError(SparseSSMError):
    """Another process writes to the directory (it holds the directory's lock); the message names
    that process and what to do."""

    exit_code = 2


class TrainingError(SparseSSMError):
    """Training cannot go on; the message says why and what was kept."""


class TeacherError(SparseSSMError):
    """The teacher cannot be reached or used; the message says how to fix it (`summary`: what
    went wrong, in a few words)."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self.summary = summary or message


class SyntheticError(SparseSSMError):
    """The synthetic-data run cannot start or go on; the message says how to fix it."""


class OutputError(SparseSSMError):
    """An output path holds something the command did not write, or overlaps the command's input;
    the message names what is there and the way out (--overwrite, --resume or another path)."""

    exit_code = 2
