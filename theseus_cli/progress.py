"""Progress reporting the library can call without knowing who listens.

The library takes a :class:`Progress`; the default does nothing. The CLI passes a rich-backed one on a terminal,
:class:`LineProgress` without one (CI logs, pipes: one plain line per phase, stage, epoch and baseline on stderr,
with elapsed time and an estimate of what is left, so a job that prints nothing for minutes is never mistaken for a
hung one; epochs shorter than :data:`NOTE_EVERY_S` are summed up, first and last always shown), or :class:`NullProgress` under ``--quiet``.

A bar's ``advance(loss=…)`` may be handed a device tensor: a bar reads it (a host sync) only when it is about to show
it, at most every :data:`SHOW_EVERY_S` seconds, so progress costs no per-step synchronisation.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Protocol, TextIO

SHOW_EVERY_S = 0.5  # a rich bar re-reads its loss at most this often
LINE_EVERY_S = 60.0  # without a terminal, a long bar prints a line at most this often between its milestones
NOTE_EVERY_S = 5.0  # and its notes (epochs) at most this often: 135 sub-second epochs are not 135 lines of a log


class Bar(Protocol):
    def advance(self, n: int = 1, **info: Any) -> None: ...

    def note(self, text: str) -> None: ...

    def done(self, text: str = "", line: bool = True) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int) -> Bar: ...

    def log(self, message: str) -> None: ...


class _NullBar:
    def advance(self, n: int = 1, **info: Any) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def done(self, text: str = "", line: bool = True) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: int) -> Bar:
        return _NullBar()

    def log(self, message: str) -> None:
        pass


def seconds(value: float) -> str:
    """``7 s``, ``3 min 05 s``, ``1 h 02 min``: elapsed and remaining times in a progress line."""
    value = max(0.0, value)
    if value < 60:
        return f"{value:.0f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def remaining(elapsed: float, done: float, total: float) -> str:
    """``, ~62 s left`` by linear extrapolation of ``done`` of ``total`` units in ``elapsed`` seconds; empty before
    the first unit (nothing to extrapolate from) and after the last."""
    if done <= 0 or total <= done:
        return ""
    return f", ~{seconds(elapsed * (total - done) / done)} left"


def info_text(info: dict[str, Any]) -> str:
    """``loss 0.1234`` from a bar's latest info (tensors read here, not at every step)."""
    return ", ".join(f"{key} {float(value):.4g}" for key, value in info.items())


class LineProgress:
    """Plain lines on ``stream`` (stderr): each :meth:`log` message, each bar's notes (an epoch, a stage) and its
    end, and for a long bar a line at most every ``every_s`` seconds; each line with the time since this progress
    began. ``clock`` is injectable so that tests check lines, not speed."""

    def __init__(self, stream: TextIO | None = None, every_s: float = LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, note_every_s: float = NOTE_EVERY_S):
        self.stream, self.every_s, self.clock, self.note_every_s = stream, every_s, clock, note_every_s
        self.started = clock()

    def write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"{line} [{seconds(self.clock() - self.started)}]\n")
        stream.flush()

    def task(self, description: str, total: int) -> "_LineBar":
        return _LineBar(self, description, total)

    def log(self, message: str) -> None:
        self.write(message)


class _LineBar:
    def __init__(self, owner: LineProgress, description: str, total: int):
        self.owner, self.description, self.total = owner, description, total
        self.count, self.info, self.noted = 0, {}, False
        self.started = self.last_line = owner.clock()

    def _status(self, with_info: bool = True) -> str:
        elapsed = self.owner.clock() - self.started
        info = info_text(self.info) if with_info else ""
        return (f"{self.count:,}/{self.total:,} steps" + (f", {info}" if info else "")
                + f", {seconds(elapsed)}{remaining(elapsed, self.count, self.total)}")

    def advance(self, n: int = 1, **info: Any) -> None:
        self.count += n
        self.info.update(info)
        now = self.owner.clock()
        if now - self.last_line >= self.owner.every_s and self.count < self.total:
            self.last_line = now
            self.owner.write(f"{self.description}: {self._status()}")

    def note(self, text: str) -> None:
        """A milestone (an epoch): printed if it is the first or the last, or ``note_every_s`` after the last line."""
        now = self.owner.clock()
        first, last = not self.noted, self.count >= self.total
        if not (first or last or now - self.last_line >= self.owner.note_every_s):
            return
        self.noted, self.last_line = True, now
        self.owner.write(f"{self.description}: {text}, {self._status(with_info=False)}")

    def done(self, text: str = "", line: bool = True) -> None:
        """The bar's last line (``line=False``: none; the caller reports the unit in its own words)."""
        if not line:
            return
        elapsed = self.owner.clock() - self.started
        info = info_text(self.info)
        parts = [p for p in (text, f"{self.count:,} steps", info, seconds(elapsed)) if p]
        self.owner.write(f"{self.description}: done, {', '.join(parts)}")
