"""What every verb needs first: device, data and guide, resolved from a recipe."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from theseus_cli.arch import load_guide
from theseus_cli.data import Dataset, load_dataset
from theseus_cli.errors import DeviceError
from theseus_cli.recipe import Recipe


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Session:
    recipe: Recipe
    data: Dataset
    guide: nn.Module
    checkpoint: Path | None
    device: torch.device

    @cached_property
    def guide_info(self) -> dict:
        """The guide's spec and checkpoint (hashed once: checkpoints can be large)."""
        info = {"arch": self.recipe.guide.arch, "kwargs": self.recipe.guide.kwargs,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "trained": self.checkpoint is not None}
        if self.checkpoint:
            info["checkpoint_sha256"] = file_sha256(self.checkpoint)
        return info


def open_session(recipe: Recipe, checkpoint: str | Path | None = None, device: str = "cpu") -> Session:
    """Resolve device, load data, build the guide (from ``checkpoint``, else the recipe's, else untrained)."""
    dev = resolve_device(device)
    ckpt = checkpoint if checkpoint is not None else recipe.guide.checkpoint
    ckpt = Path(ckpt) if ckpt is not None else None
    data = load_dataset(recipe.data, recipe.seed)
    guide = load_guide(recipe.guide.arch, recipe.guide.kwargs, ckpt, recipe.seed)
    return Session(recipe, data, guide.to(dev), ckpt, dev)
