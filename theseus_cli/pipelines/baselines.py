"""What a user would do instead of converting, trained in the same run for the conversion's gradient steps.

* ``scratch`` — the target architecture, every weight fresh, on the labelled examples (the paper's naive target).
* ``guide-init`` — the guide's weights everywhere the target can take them (the kept modules in place; the stem,
  embeddings and head in a transfer), the replaced modules fresh: the conversion without its alignment.
* ``distill`` — the fresh target of ``scratch`` (the same initial weights) trained with the guide as teacher
  (:mod:`theseus_cli.training.distill`) on every training input alignment sees, plus the task loss on the labelled
  ones: what torchdistill users do, with the same unlabelled data NoT's alignment gets.

Each runs exactly ``alignment steps + fine-tuning steps`` optimiser steps with fine-tuning's schedule (warm-up,
then cosine decay over all of them) and learning rate (``baseline.lr`` overrides it), so the comparison is at an
equal step budget. A ``distill`` step also runs the guide on its batch of unlabelled inputs; its seconds are
reported, so the extra cost is visible.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

import torch

from theseus_cli.models.checkpoint_fit import rebuild_head
from theseus_cli.models.build import build_model
from theseus_cli.surgery.plan import apply_entries
from theseus_cli.surgery.transfer import inherit_weights
from theseus_cli.training.distill import Teacher

if TYPE_CHECKING:
    from theseus_cli.pipelines.convert import Conversion

LABELS = {"scratch": "target from scratch", "guide-init": "target from the guide's weights, no alignment",
          "distill": "target distilled from the guide"}


def train_baselines(conv: "Conversion", finished: dict[str, dict[str, Any]] | None = None,
                    on_finished: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every run of ``baseline.runs`` in order: metric, steps, learning rate, seconds and loss per epoch. Runs in
    ``finished`` (a resumed conversion's) are taken as they are; ``on_finished`` gets the results so far after each
    run (the resume checkpoint). Each run is seeded on its own, so skipping one changes no other."""
    recipe = conv.recipe
    ft_steps, warmup = conv.task_steps()  # the same warm-up as fine-tuning, over all its steps
    total = conv.align_steps + ft_steps
    lr = recipe.baseline.lr or recipe.finetune.lr
    out = {}
    for run in recipe.baseline.runs:
        if finished and run in finished:
            out[run] = finished[run]
            conv.progress.log(f"baseline: {LABELS[run]} finished before the resume")
            continue
        model = baseline_model(conv, from_guide=run == "guide-init")
        teacher = distill_teacher(conv, recipe.baseline.distill, "distill_teacher") if run == "distill" else None
        res = conv.train_on_task(model, total, warmup, lr, "baseline", f"baseline: {LABELS[run]}", teacher)
        out[run] = {conv.task.metric: conv.evaluate(model), "steps": total, "lr": lr, "seconds": res.seconds,
                    "epoch_losses": res.epoch_losses, "compile": res.compile}
        conv.progress.log(f"baseline {len(out)}/{len(recipe.baseline.runs)}: {LABELS[run]}: test {conv.task.metric} "
                          f"{out[run][conv.task.metric]:.4f}")
        if teacher is not None:
            out[run]["distill"] = recipe.baseline.distill.model_dump()
        if on_finished is not None:
            on_finished(out)
    return out


def distill_teacher(conv: "Conversion", cfg, stream: str) -> Teacher:
    """The guide as teacher with ``cfg``'s weight and temperature, on all training inputs (own batch order from
    the ``stream`` seed) or on the labelled batch."""
    data = conv.session.data
    everything = cfg.inputs == "all"
    return Teacher(conv.guide, cfg.weight, cfg.temperature, data.x_train if everything else None,
                   conv.seeds.generator(stream) if everything else None)


def baseline_model(conv: "Conversion", from_guide: bool) -> torch.nn.Module:
    """The target architecture from the ``baseline_init`` seed, or (``from_guide``) with every guide weight it can
    inherit. Seeded the same for every run, so ``scratch`` and ``distill`` start from the same weights."""
    recipe, dev, seed = conv.recipe, conv.session.device, conv.seeds.baseline_init
    torch.manual_seed(seed)
    if recipe.target is not None:
        model = conv.rt.prepare(build_model(recipe.target.arch, recipe.target.kwargs, seed, recipe.task).to(dev))
        if from_guide:
            inherit_weights(conv.guide, model, conv.plan_.blocks)
        return model
    model = copy.deepcopy(conv.guide) if from_guide else fresh_guide_architecture(conv, seed)
    apply_entries(model, conv.plan_.entries)
    return model


def fresh_guide_architecture(conv: "Conversion", seed: int) -> torch.nn.Module:
    """The guide's architecture (with the head the session gave it) from fresh weights seeded by ``seed``, on the
    run's device: a baseline's start, and a ``start: fresh`` conversion's."""
    recipe = conv.recipe
    model = rebuild_head(build_model(recipe.guide.arch, recipe.guide.kwargs, seed, recipe.task), conv.session.head, seed)
    return conv.rt.prepare(model.to(conv.session.device))
