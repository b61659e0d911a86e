"""Rich progress bars for the CLI (never used under CI=true or --quiet)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _RichBar:
    def __init__(self, progress: Progress, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int = 1, **info: float) -> None:
        self.progress.advance(self.task_id, n)

    def done(self) -> None:
        self.progress.remove_task(self.task_id)
        if not self.progress.tasks:
            self.progress.stop()


class RichProgress:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)

    def task(self, description: str, total: int) -> _RichBar:
        self.progress.start()
        return _RichBar(self.progress, self.progress.add_task(description, total=total))

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)
