"""The split a search ranks its trials on, carved from the training data: the test split never chooses.

``validation.size`` training inputs are held out of every trial, seeded by the recipe's seed. What they are scored
on (``validation.rank_by``):

* ``labels`` — the task's own metric on their labels (for text tasks the only choice, and label-free anyway:
  a language model's next tokens and a sentence encoder's guide embeddings need no annotation). Where
  ``data.label_limit`` makes labels scarce, the held-out inputs are drawn from the **labelled** ones, at most a
  fifth of them, and the trials train on the rest;
* ``guide-agreement`` — classification only: the share of held-out inputs on which the trial's target predicts
  the guide's class. It needs no labels, so the held-out inputs are drawn from the **unlabelled** part of the
  training split and a few-label run keeps every one of its labels for training.

``auto`` (the default) ranks by labels where every input is labelled or a fifth of the labelled inputs is at
least :data:`MIN_LABELLED` examples, and by guide agreement only below that. Why labels even when they are few: agreement
with the guide ranks how well a candidate *imitates* the guide, and a few-label guide is exactly the one its targets
outgrow. The CNN search of docs/BENCHMARKS.md showed it: ranked by agreement, the three full-budget trials came out
in exactly the reverse order of their test accuracy (all of them above the guide's). A few hundred labels are a
noisy but unbiased ranking; the winner's choice then allows for that noise (``validation.choose``,
:mod:`theseus_cli.pipelines.search.finish`). The search reports how well its ranking predicted the test metric (the
rank correlation over the trials that reached the full budget).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from theseus_cli.data.core import iterate_batches
from theseus_cli.training.session import Session

HELD_OUT_SHARE = 5  # at most 1/5 of the training split (of its labelled inputs, where labels are scarce) is held out
MIN_LABELLED = 100  # auto ranks by labels when it can hold out at least this many labelled inputs


def rank_mode(data, task: str, rank_by: str) -> str:
    """What the held-out inputs are scored on: ``labels`` or ``guide-agreement`` (``auto`` resolved)."""
    if task != "classification":
        return "labels"
    if rank_by == "auto":
        labelled = int(data.labelled.numel())
        every = labelled >= int(data.x_train.shape[0])
        return "labels" if every or labelled // HELD_OUT_SHARE >= MIN_LABELLED else "guide-agreement"
    return rank_by


@dataclasses.dataclass(frozen=True)
class HeldOut:
    indices: torch.Tensor  # into the training split, sorted
    mode: str  # labels | guide-agreement
    origin: str  # which inputs they were drawn from, in words
    labelled: torch.Tensor  # the training split's labelled inputs, as a mask


def held_out(data, task: str, size: int, rank_by: str, seed: int) -> HeldOut:
    """The training inputs a search holds out to rank on, seeded by ``seed``: a function of the data alone, so that
    ``train-guide`` on a search file can leave exactly these labels out of the guide's training."""
    mode = rank_mode(data, task, rank_by)
    n = int(data.x_train.shape[0])
    size = min(size, n // HELD_OUT_SHARE)
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[data.labelled.cpu()] = True
    gen = torch.Generator().manual_seed(seed + 9173)
    pool, origin = torch.arange(n), "training inputs"
    if mode == "guide-agreement" and int((~labelled).sum()) >= size:
        pool, origin = pool[~labelled], "unlabelled training inputs"
    elif mode == "labels" and task == "classification" and int((~labelled).sum()) > 0:  # scarce labels: hold out a share of them, never more
        pool, origin = pool[labelled], "labelled training inputs"
        size = min(size, max(1, pool.numel() // HELD_OUT_SHARE))
    return HeldOut(pool[torch.randperm(pool.numel(), generator=gen)[:size]].sort().values, mode, origin, labelled)


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
    data = session.data
    found = held_out(data, session.recipe.task, size, rank_by, seed)
    n, held, mode, labelled = int(data.x_train.shape[0]), found.indices, found.mode, found.labelled
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
    info = {"size": int(held.numel()), "rank_by": mode, "from": found.origin, "train_left": int(keep.numel()),
            "labelled_left": int(kept_labels.numel())}
    return dataclasses.replace(session, data=trial_data), info
