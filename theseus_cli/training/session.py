"""What every verb needs first: device, data and guide, resolved from a recipe."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from theseus_cli.models.build import load_guide_fitted, pickles_trusted, resolve_checkpoint
from theseus_cli.models.checkpoint_fit import CheckpointFit
from theseus_cli.training.probe import probe_reset_head
from theseus_cli.training.runtime import default_dtype
from theseus_cli.data.dataset import Dataset, load_dataset
from theseus_cli.errors import DataError, DeviceError
from theseus_cli.config.recipe import Recipe
from theseus_cli.target_meta import HeadSpec


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
    fitted: dict | None = None  # what guide.key_map / ignore_keys / head did (checkpoint_fit.FitReport), and the probe

    @property
    def head(self) -> HeadSpec | None:
        """The guide's reset head (``guide.head: reset``), as target metadata records it; None if it kept its own."""
        head = (self.fitted or {}).get("head")
        return HeadSpec(path=head["path"], classes=head["classes"]) if head else None

    @cached_property
    def guide_info(self) -> dict:
        """The guide's spec and checkpoint (hashed once: checkpoints can be large)."""
        info = {"arch": self.recipe.guide.arch, "kwargs": self.recipe.guide.kwargs,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "trained": self.checkpoint is not None}
        if self.checkpoint:
            info["checkpoint_sha256"] = file_sha256(self.checkpoint)
            info["unpickled_in_full"] = pickles_trusted() and self.checkpoint.suffix != ".safetensors"
        if self.fitted is not None:
            info["checkpoint_fit"] = self.fitted
        return info


def open_session(recipe: Recipe, checkpoint: str | Path | None = None, device: str = "cpu", probe: bool = True,
                 weights_dtype: torch.dtype | None = None) -> Session:
    """Resolve device, load data, build the guide.

    The guide's weights come from ``checkpoint``, else the recipe's ``guide.checkpoint``, else the
    weights file of an ``hf:`` model directory; with none of these it is untrained (seeded).
    """
    from theseus_cli.models.hf import default_checkpoint

    dev = resolve_device(device)
    ckpt = checkpoint if checkpoint is not None else recipe.guide.checkpoint
    ckpt = resolve_checkpoint(ckpt) if ckpt is not None else default_checkpoint(recipe.guide.arch)
    data = load_dataset(recipe.data, recipe.seed, recipe.task, recipe.guide.arch)
    guide, fitted = prepared_guide(recipe, ckpt, data, dev, probe, weights_dtype)
    return Session(recipe, data, guide, ckpt, dev, fitted)


def prepared_guide(recipe: Recipe, checkpoint: Path | None, data, device: torch.device, probe: bool = True,
                   weights_dtype: torch.dtype | None = None) -> tuple[nn.Module, dict | None]:
    """The recipe's guide on ``device``, its checkpoint fitted (``guide.key_map``/``ignore_keys``/``head``) and,
    with ``head: reset``, its new head fitted as a linear probe (:mod:`theseus_cli.training.probe`; not with
    ``probe=False``, as ``inspect`` plans without training anything); checked
    against the data (vocabulary, classes). Also what fitting did, or None where nothing was asked. ``weights_dtype``:
    the guide is built in that dtype, its checkpoint read into it (:func:`~theseus_cli.training.runtime.frozen_weights_dtype`)."""
    cfg = recipe.guide
    fit = CheckpointFit.of(cfg, data.num_classes)
    with default_dtype(weights_dtype):
        guide, report = load_guide_fitted(cfg.arch, cfg.kwargs, checkpoint, recipe.seed, recipe.task, fit)
    guide = guide.to(device)
    check_vocabulary(guide, data)
    if not fit.changes_anything:
        check_classes(guide, data, "the guide")
        return guide, None
    fitted = report.to_dict()
    if report.head is not None and probe:
        fitted["head"]["probe"] = probe_reset_head(guide, report.head["path"], data, cfg.head_probe_steps,
                                                   recipe.seed, device)
    check_classes(guide, data, "the guide")
    return guide, fitted


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
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != data.num_classes:
        fix = f"set its num_classes in kwargs to {data.num_classes}" + (
            ", or guide.head: reset to give a pretrained checkpoint a new head" if what == "the guide" else "")
        raise DataError(f"data: {data.num_classes} classes, but {what} outputs {out.shape[1]} logits per example ({fix})")


def attach_guide_embeddings(session: Session) -> None:
    """Sentence-embedding task: the guide's embeddings are the targets to reproduce (``y``)."""
    from theseus_cli.training.loops import embed

    data, bs = session.data, session.recipe.data.eval_batch_size
    if data.y_train is not None and data.y_test is not None:  # already embedded (a search's trials share them)
        return
    data.y_train = embed(session.guide, data.x_train, bs, session.device)
    data.y_test = embed(session.guide, data.x_test, bs, session.device)
