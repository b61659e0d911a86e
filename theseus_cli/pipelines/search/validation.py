"""The split a search ranks its trials on, carved from the training data: the test split never chooses.

``validation.size`` training inputs (at most a fifth of the split) are held out of every trial, seeded by the
recipe's seed. What they are scored on (``validation.rank_by``):

* ``labels`` — the task's own metric on their labels (for text tasks the only choice, and label-free anyway:
  a language model's next tokens and a sentence encoder's guide embeddings need no annotation);
* ``guide-agreement`` — classification only: the share of held-out inputs on which the trial's target predicts
  the guide's class. It needs no labels, so the held-out inputs are drawn from the **unlabelled** part of the
  training split and a few-label run keeps every one of its labels for training. ``auto`` (the default) takes it
  whenever ``data.label_limit`` leaves inputs unlabelled: holding out a thousand labelled images when training
  sees a few hundred would spend most of the labels on ranking. The price is that agreement with the guide
  ranks how well a candidate imitates the guide, not how well it does the task; the search reports how well its
  ranking predicted the test metric (the rank correlation over the trials that reached the full budget).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from theseus_cli.data.core import iterate_batches
from theseus_cli.training.session import Session

HELD_OUT_SHARE = 5  # at most 1/5 of the training split is held out


def rank_mode(session: Session, rank_by: str) -> str:
    data = session.data
    if session.recipe.task != "classification":
        return "labels"
    scarce = int(data.labelled.numel()) < int(data.x_train.shape[0])
    if rank_by == "auto":
        return "guide-agreement" if scarce else "labels"
    return rank_by


def _guide_classes(session: Session, x) -> torch.Tensor:
    from theseus_cli.batch import run_model
    from theseus_cli.models.hf import model_output

    guide, out = session.guide.eval(), []
    with torch.no_grad():
        for idx in iterate_batches(x.shape[0], session.recipe.data.eval_batch_size, None, drop_last=False):
            out.append(model_output(run_model(guide, x[idx].to(session.device))).argmax(-1).cpu())
    return torch.cat(out)


def carve_validation(session: Session, size: int, rank_by: str, seed: int) -> tuple[Session, dict[str, Any]]:
    """A session whose test split is the held-out validation inputs and whose training split is the rest (its
    labelled indices renumbered), and what was held out."""
    data, mode = session.data, rank_mode(session, rank_by)
    n = int(data.x_train.shape[0])
    size = min(size, n // HELD_OUT_SHARE)
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[data.labelled.cpu()] = True
    gen = torch.Generator().manual_seed(seed + 9173)
    pool = torch.arange(n)
    if mode == "guide-agreement" and int((~labelled).sum()) >= size:
        pool = pool[~labelled]
    held = pool[torch.randperm(pool.numel(), generator=gen)[:size]].sort().values
    keep_mask = torch.ones(n, dtype=torch.bool)
    keep_mask[held] = False
    keep = keep_mask.nonzero().squeeze(1)
    position = torch.full((n,), -1, dtype=torch.long)
    position[keep] = torch.arange(keep.numel())
    kept_labels = position[labelled & keep_mask].sort().values
    x_val = data.x_train[held]
    if mode == "guide-agreement":
        y_val = _guide_classes(session, x_val)
    else:
        y_val = data.y_train[held] if data.y_train is not None and data.kind == "image" else None
    y_train = data.y_train[keep] if data.y_train is not None and data.kind == "image" else None
    trial_data = dataclasses.replace(data, x_train=data.x_train[keep], y_train=y_train, x_test=x_val, y_test=y_val,
                                     labelled=kept_labels)
    info = {"size": size, "rank_by": mode, "from": "unlabelled training inputs" if pool.numel() < n else
            "training inputs", "train_left": int(keep.numel()), "labelled_left": int(kept_labels.numel())}
    return dataclasses.replace(session, data=trial_data), info
