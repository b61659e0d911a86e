"""The tool's own error types.

Every problem a user can cause (bad recipe, bad checkpoint, missing data, a
module the rule cannot replace, ...) is raised as a :class:`TheseusError`
subclass. The CLI turns these into one line on stderr and a distinct exit code;
anything else is a bug and surfaces as exit code 1 (with a traceback only under
``--debug``).
"""

from __future__ import annotations


class TheseusError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # keep it one line whatever the message holds
        return " ".join(self.message.split())


class RecipeError(TheseusError):
    """The recipe file is missing, malformed or invalid."""

    exit_code = 3


class ModelError(TheseusError):
    """The guide architecture cannot be built, or a checkpoint cannot be used."""

    exit_code = 4


class MatchError(TheseusError):
    """Replacement rules do not resolve to a valid plan (no match, overlap, shape)."""

    exit_code = 5


class DataError(TheseusError):
    """A data set cannot be found or read."""

    exit_code = 6


class DeviceError(TheseusError):
    """The requested device is not available."""

    exit_code = 7


class OutputError(TheseusError):
    """The output directory cannot be used (exists and is not a run, unwritable)."""

    exit_code = 8


class TrainingError(TheseusError):
    """Training diverged (NaN/Inf loss) or could not proceed."""

    exit_code = 9


class GateError(TheseusError):
    """A quality gate (``--min-retention``, ``--max-latency-ms``) failed; the run's files are complete."""

    exit_code = 10


class ExportError(TheseusError):
    """A target could not be exported, or the exported file's outputs differ from PyTorch's."""

    exit_code = 11
