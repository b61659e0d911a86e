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

    def __str__(self) -> str:  # one line whatever the message holds, and a readable one however long it is
        return one_line(self.message)


MAX_MESSAGE = 2000  # characters of one error line; the rest is cut, saying how much there was


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters keeping the start and
    saying how long it was: a message quoting a megabyte of user input must not become a megabyte of stderr."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (cut: {len(text):,} characters in all)"


class UsageError(TheseusError):
    """The command line itself is wrong: flags that conflict, a file given to the wrong runtime."""

    exit_code = 2


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
    """The requested device is not available, or has too little memory for what was asked."""

    exit_code = 7


class OutputError(TheseusError):
    """The output directory cannot be used (exists and is not a run, in use by another run, unwritable, full)."""

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


# Where the disk, not the program, is the problem: mapped to one line naming the path and the cause (exit 8).
_DISK_ERRNOS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
                "EROFS": "read-only file system", "EACCES": "permission denied", "EPERM": "operation not permitted",
                "EFBIG": "file too large for this file system or process limit"}


def disk_error(exc: BaseException, path: object | None = None) -> "OutputError | None":
    """An :class:`OutputError` for an ``OSError`` caused by the disk (full, read-only, no permission), else None."""
    import errno

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    name = errno.errorcode.get(exc.errno)
    if name not in _DISK_ERRNOS:
        return None
    where = exc.filename or path or "output"
    return OutputError(f"{where}: cannot write: {_DISK_ERRNOS[name]} ({name})")


class TheseusWarning(UserWarning):
    """Something the user most likely did not mean, though the run can go on (an untrained guide where a trained
    one was probably meant). The CLI prints it as one ``warning:`` line on stderr; a library caller sees it through
    :mod:`warnings` as usual."""
