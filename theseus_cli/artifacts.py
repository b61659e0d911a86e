"""Files a conversion writes, written atomically, and reading them back.

``target.safetensors`` holds the converted weights plus, in its metadata, all
that is needed to rebuild the architecture: the guide spec (arch + kwargs) and
the plan entries (which module became what, with its params and shapes), the
resolved recipe and the input normalisation. :func:`load_target` rebuilds the
model from that file alone — no recipe, guide checkpoint or data needed (only
the code a ``module:function`` guide spec names must be importable).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from theseus_cli.arch import build_model
from theseus_cli.errors import ModelError, OutputError
from theseus_cli.plan import PlanEntry, apply_entries

FORMAT = "theseus-target/1"
TARGET_FILE = "target.safetensors"
REPORT_FILE = "report.json"
PLOT_FILE = "alignment.png"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temp file beside ``path``, then rename over it.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    The file gets ordinary permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def save_target(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    metadata = {"format": FORMAT, "theseus": json.dumps(meta, sort_keys=True)}
    model = model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors (runtime.channels_last)
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=metadata))


def _target_path(path: str | Path) -> Path:
    path = Path(path)
    return path / TARGET_FILE if path.is_dir() else path


def read_target_metadata(path: str | Path) -> dict[str, Any]:
    """The ``theseus`` metadata of a saved target (a run directory or the file)."""
    from safetensors import safe_open

    file = _target_path(path)
    if not file.is_file():
        raise ModelError(f"{file}: target file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ModelError(f"{file}: not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT or "theseus" not in metadata:
        raise ModelError(f"{file}: not a theseus target (metadata format {metadata.get('format')!r})")
    return json.loads(metadata["theseus"])


def load_target(path: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a converted target from ``target.safetensors`` (or its run directory).

    Returns the model in eval mode; ``model.theseus_meta`` holds the metadata
    (input shape, normalisation, plan, recipe).
    """
    from safetensors.torch import load_model

    file = _target_path(path)
    meta = read_target_metadata(file)
    task = meta.get("task", "classification")
    if meta.get("target"):  # architecture transfer: the target is its own architecture
        model = build_model(meta["target"]["arch"], meta["target"]["kwargs"], seed=0, task=task)
    else:
        model = build_model(meta["guide"]["arch"], meta["guide"]["kwargs"], seed=0, task=task)
    apply_entries(model, [PlanEntry.from_dict(e) for e in meta["entries"]])
    try:
        load_model(model, str(file), strict=True, device=device)
    except Exception as exc:
        raise ModelError(f"{file}: weights do not fit the rebuilt target: {exc}") from None
    model.to(device).eval()
    model.theseus_meta = meta
    return model


def _is_run(out: Path) -> bool:
    return any((out / name).exists() for name in (".resume", TARGET_FILE, REPORT_FILE))


def prepare_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to mix a new run into a non-empty directory unless ``overwrite``; ``resume`` needs a directory that
    holds a run (or nothing). Temporary files a killed run left behind (``atomic_write``'s) are removed."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if not resume:
            raise OutputError(f"{out}: directory exists and is not empty (use --resume to continue a killed run there, "
                              "or --overwrite to replace its files)")
        if not _is_run(out):
            raise OutputError(f"{out}: --resume, but the directory holds no theseus run (no .resume/, {TARGET_FILE} or "
                              f"{REPORT_FILE}); use another --out, or --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output directory: {exc}") from None
    for folder in (out, out / ".resume"):
        for stale in folder.glob(".*.tmp") if folder.is_dir() else []:
            stale.unlink(missing_ok=True)
