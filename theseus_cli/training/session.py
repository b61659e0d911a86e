"""What every verb needs first: device, data and guide, resolved from a recipe."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from theseus_cli.models.build import load_guide, pickles_trusted
from theseus_cli.data.dataset import Dataset, load_dataset
from theseus_cli.errors import DataError, DeviceError
from theseus_cli.config.recipe import Recipe


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
            info["unpickled_in_full"] = pickles_trusted() and self.checkpoint.suffix != ".safetensors"
        return info


def open_session(recipe: Recipe, checkpoint: str | Path | None = None, device: str = "cpu") -> Session:
    """Resolve device, load data, build the guide.

    The guide's weights come from ``checkpoint``, else the recipe's ``guide.checkpoint``, else the
    weights file of an ``hf:`` model directory; with none of these it is untrained (seeded).
    """
    from theseus_cli.models.hf import default_checkpoint

    dev = resolve_device(device)
    ckpt = checkpoint if checkpoint is not None else recipe.guide.checkpoint
    ckpt = Path(ckpt) if ckpt is not None else default_checkpoint(recipe.guide.arch)
    data = load_dataset(recipe.data, recipe.seed, recipe.task, recipe.guide.arch)
    guide = load_guide(recipe.guide.arch, recipe.guide.kwargs, ckpt, recipe.seed, recipe.task)
    check_vocabulary(guide, data)
    check_classes(guide, data, "the guide")
    return Session(recipe, data, guide.to(dev), ckpt, dev)


def check_vocabulary(model: nn.Module, data) -> None:
    """Token ids must fit the model's input embedding (a tokenizer/model mismatch otherwise fails deep inside)."""
    if data.kind != "tokens" or not hasattr(model, "get_input_embeddings"):
        return
    emb = model.get_input_embeddings()
    if emb is not None and emb.num_embeddings < data.vocab_size:
        raise DataError(f"data.tokenizer: {data.tokenizer} has {data.vocab_size} tokens but the guide's input embedding "
                        f"has {emb.num_embeddings} rows (set the guide's vocab_size, or use the guide's tokenizer)")


def check_classes(model: nn.Module, data, what: str) -> None:
    """Classification: the model must give a logit for every class the data's labels name.

    Otherwise the first task loss fails with an ``IndexError`` — after the whole alignment. One dry forward on
    two training images (in eval mode, so no BatchNorm statistic moves) finds it before any work.
    """
    if data.kind != "image" or not data.num_classes:
        return
    from theseus_cli.models.hf import model_output

    was_training = model.training
    try:
        with torch.no_grad():
            out = model_output(model.eval()(data.x_train[:2].to(next(model.parameters(), torch.empty(0)).device)))
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] < data.num_classes:
        raise DataError(f"data: labels go up to {data.num_classes - 1} ({data.num_classes} classes), but {what} outputs "
                        f"{out.shape[1]} logits per example (set its num_classes in kwargs to {data.num_classes})")


def attach_guide_embeddings(session: Session) -> None:
    """Sentence-embedding task: the guide's embeddings are the targets to reproduce (``y``)."""
    from theseus_cli.training.loops import embed

    data, bs = session.data, session.recipe.data.eval_batch_size
    data.y_train = embed(session.guide, data.x_train, bs, session.device)
    data.y_test = embed(session.guide, data.x_test, bs, session.device)
