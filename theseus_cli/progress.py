"""Progress reporting the library can call without knowing who listens.

The library takes a :class:`Progress`; the default does nothing. The CLI
passes a rich-backed one, or the silent one under ``CI=true``/``--quiet``.
"""

from __future__ import annotations

from typing import Protocol


class Bar(Protocol):
    def advance(self, n: int = 1, **info: float) -> None: ...

    def done(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int) -> Bar: ...

    def log(self, message: str) -> None: ...


class _NullBar:
    def advance(self, n: int = 1, **info: float) -> None:
        pass

    def done(self) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: int) -> Bar:
        return _NullBar()

    def log(self, message: str) -> None:
        pass
