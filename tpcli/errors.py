"""Typed errors. The library raises them; `tpcli.cli.main` renders each as one line and exits non-zero.

Every message names the file, flag or key at fault and says what to do about it.
"""

from __future__ import annotations


class TpcliError(Exception):
    """Base class of every error a user can trigger. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(TpcliError):
    """A flag combination or value that can never work (exit 2, like Click's usage errors)."""

    exit_code = 2


class ModelError(TpcliError):
    """The model source (directory, hub id, config) cannot be resolved or built."""


class PlanError(TpcliError):
    """The TP plan is missing, malformed or names something the model does not have."""


class CheckpointError(TpcliError):
    """A checkpoint or sharded directory is unreadable, incomplete or corrupt."""


class OutputError(TpcliError):
    """The output location cannot be written (exists, not empty, ...)."""


class LaunchError(TpcliError):
    """Workers could not be started, or a worker failed."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class VerifyError(TpcliError):
    """A check found errors (the findings have already been reported)."""
