"""The output directory of a run: at every instant a finished run or visibly an unfinished one.

A run directory is *finished* when it holds ``report.json``, which every run writes last. So:

* **One run at a time.** :func:`run_directory` takes an exclusive ``fcntl`` lock on ``DIR/.theseus.lock``
  (holding the owner's pid) for the whole run; a second run into the same directory stops at once with
  exit 8, naming the first. The lock file is removed when the run ends.
* **Writable, checked first.** Creating the lock file is the probe: a read-only, full or forbidden
  directory is one line (exit 8) before any work, not an ``OSError`` after the first stage.
* **Overwrite invalidates first.** ``--overwrite`` (and any run into a directory that held a run)
  removes the old ``report.json`` before anything else, then the old target, plot and exports, so a
  killed or failed overwrite can never look like a finished run of the other recipe; ``--resume``
  keeps the stage checkpoints it resumes from, and a finished run whole (resuming it is a no-op
  that returns its report, see :func:`theseus_cli.pipelines.convert.run_conversion`).
* **No empty leftovers.** A run that fails before writing anything removes the directory it created.

Writes inside the run are atomic (:func:`theseus_cli.artifacts.atomic_write`), and a disk that fills up
or turns read-only mid-run is one line naming the path and the cause (:func:`theseus_cli.errors.disk_error`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from theseus_cli.artifacts import PLOT_FILE, REPORT_FILE, TARGET_FILE
from theseus_cli.errors import OutputError, disk_error

LOCK_FILE = ".theseus.lock"
RESUME_DIR = ".resume"
EXPORTS = ("target.onnx", "target.torchscript.pt", "hf")  # what `theseus export` writes by default, made from the target


def _is_run(out: Path) -> bool:
    return any((out / name).exists() for name in (RESUME_DIR, TARGET_FILE, REPORT_FILE))


def _contents(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK_FILE]


def _cannot_write(out: Path, exc: OSError) -> OutputError:
    return disk_error(exc, out) or OutputError(f"{out}: cannot write to the output directory: {exc.strerror or exc}")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (see the module docstring); the lock file names its holder."""
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _cannot_write(out, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            raise OutputError(f"{out}: in use by another theseus run ({holder}); wait for it to finish, or use "
                              "another --out") from None
        try:  # the previous holder may have unlinked the file between our open and our lock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        os.close(fd)
        raise _cannot_write(out, exc) from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock is released, so no one locks a file about to vanish
        os.close(fd)


def _check_contents(out: Path, overwrite: bool, resume: bool) -> None:
    if not _contents(out) or overwrite:
        return
    if not resume:
        raise OutputError(f"{out}: directory exists and is not empty (use --resume to continue a killed run there, "
                          "or --overwrite to replace its files)")
    if not _is_run(out):
        raise OutputError(f"{out}: --resume, but the directory holds no theseus run (no {RESUME_DIR}/, {TARGET_FILE} or "
                          f"{REPORT_FILE}); use another --out, or --overwrite")


def finished(out: Path) -> bool:
    return (out / REPORT_FILE).is_file()


def unfinished_run(path: Path) -> bool:
    """A directory that a run has started to use (or was killed in) but not finished."""
    return path.is_dir() and not finished(path) and any((path / n).exists() for n in (RESUME_DIR, TARGET_FILE, LOCK_FILE))


def _invalidate(out: Path, resume: bool) -> None:
    """Remove an earlier run's files, the ``report.json`` that marks it finished first. ``resume`` keeps the stage
    checkpoints to resume from, or, when the run had finished, the whole run (only a kill's leftovers go)."""
    if resume and finished(out):
        names = [RESUME_DIR]  # killed between writing the report and removing its checkpoints
    else:
        names = [REPORT_FILE, TARGET_FILE, PLOT_FILE, *EXPORTS, *([] if resume else [RESUME_DIR])]
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for folder in (out, out / RESUME_DIR):  # temporary files of writes a kill cut short
        for stale in folder.glob(".*.tmp") if folder.is_dir() else []:
            stale.unlink(missing_ok=True)


def check_out_path(out: Path, overwrite: bool, resume: bool) -> None:
    """The checks that need no lock (what every process of a torchrun job can do)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir():
        _check_contents(out, overwrite, resume)


@contextmanager
def run_directory(out: str | Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Prepare ``out`` for a run and hold it for the run's duration (see the module docstring)."""
    out = Path(out)
    check_out_path(out, overwrite, resume)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(out, exc) from None
    try:
        with _locked(out):
            _check_contents(out, overwrite, resume)  # again, now that no other run can change it
            _invalidate(out, resume)
            try:
                yield out
            except OSError as exc:
                err = disk_error(exc, out)
                if err is None:
                    raise
                raise err from None
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves nothing behind
        raise


def locked(out: Path):
    """The exclusive lock of :func:`run_directory` on a directory that is not a run (``theseus search``'s output):
    a second holder stops at once with exit 8, naming the first."""
    return _locked(out)
