"""Stage checkpoints, so a killed conversion resumes from its last finished stage.

After every alignment stage, ``convert`` atomically replaces one file,
``OUT/.resume/stages.pt``, holding the hybrid target's state dict, the
results of the finished stages, the alignment batch generator's state and a
fingerprint of what is being converted (resolved recipe hash and guide
checkpoint hash). ``convert --resume`` rebuilds the hybrid up to that stage,
loads the state and carries on; everything later (stage seeds, batch order,
recalibration, fine-tuning) is seeded, so the resumed run reaches the same
target as an uninterrupted one. The file is read with ``weights_only=True``
and removed when the run finishes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.artifacts import atomic_write
from theseus_cli.errors import OutputError

RESUME_DIR = ".resume"
RESUME_FILE = "stages.pt"


def _file(out: Path) -> Path:
    return out / RESUME_DIR / RESUME_FILE


def save_stages(out: Path, target: nn.Module, stages: list[dict[str, Any]], generator: torch.Generator,
                fingerprint: dict[str, Any]) -> None:
    payload = {
        "fingerprint": fingerprint,
        "stages": stages,
        "generator": generator.get_state(),
        "state": {k: v.detach().cpu().clone() for k, v in target.state_dict().items()},
    }
    atomic_write(_file(out), lambda tmp: torch.save(payload, tmp))


def load_stages(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The last stage checkpoint in ``out``, or None; refuses one made for another recipe or guide."""
    file = _file(out)
    if not file.is_file():
        return None
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise OutputError(f"{file}: unreadable stage checkpoint ({type(exc).__name__}); delete it or drop --resume") from None
    if payload.get("fingerprint") != fingerprint:
        raise OutputError(f"{file}: made for a different recipe or guide checkpoint; use another --out or --overwrite")
    return payload


def clear(out: Path) -> None:
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
