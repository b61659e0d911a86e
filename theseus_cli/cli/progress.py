"""Rich progress bars for the CLI on a terminal (never under CI=true, without a terminal, or with --quiet)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from theseus_cli.progress import SHOW_EVERY_S, info_text


class _RichBar:
    def __init__(self, progress: Progress, task_id):
        self.progress, self.task_id = progress, task_id
        self.shown = 0.0

    def advance(self, n: int = 1, **info: Any) -> None:
        now = time.monotonic()
        if info and now - self.shown >= SHOW_EVERY_S:  # reading a device tensor syncs: at most twice a second
            self.shown = now
            self.progress.update(self.task_id, advance=n, info=info_text(info))
        else:
            self.progress.advance(self.task_id, n)

    def note(self, text: str) -> None:
        self.progress.update(self.task_id, info=text)

    def done(self, text: str = "", line: bool = True) -> None:
        self.progress.remove_task(self.task_id)
        if not self.progress.tasks:
            self.progress.stop()


class RichProgress:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)

    def task(self, description: str, total: int) -> _RichBar:
        self.progress.start()
        return _RichBar(self.progress, self.progress.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)
