"""``theseus inspect``: the replacement plan as data, before anything is cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from theseus_cli.data.core import batches_per_epoch
from theseus_cli.models.build import build_model
from theseus_cli.surgery.schedule import build_stages
from theseus_cli.training.runtime import align_batch_size, frozen_weights_dtype
from theseus_cli.surgery.plan import build_plan
from theseus_cli.config.recipe import Recipe
from theseus_cli.seeds import Seeds
from theseus_cli.training.session import check_classes, open_session
from theseus_cli.surgery.transfer import build_transfer_plan


def inspect_guide(recipe: Recipe, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Build the plan for ``recipe`` on its guide and return it as plain data (``kind``: replace or transfer)."""
    # the guide as the conversion holds it (bf16 frozen weights: half the memory, and the memory check sees that)
    session = open_session(recipe, checkpoint, "cpu", probe=False, weights_dtype=frozen_weights_dtype(recipe))
    sample = session.data.x_train[:2]
    if recipe.target is not None:
        target = build_model(recipe.target.arch, recipe.target.kwargs, Seeds(recipe.seed).target_init, recipe.task)
        check_classes(target, session.data, f"the target {recipe.target.arch}")
        plan = build_transfer_plan(session.guide, target, recipe, sample)
        out = plan.to_dict()
        out["kind"] = "transfer"
        out["target"] = {"arch": recipe.target.arch, "kwargs": recipe.target.kwargs}
        out["flop_ratio"] = plan.target_flops / max(1, plan.guide_flops)
    else:
        plan = build_plan(session.guide, recipe, sample)
        out = plan.to_dict()
        out["kind"] = "replace"
        out["flop_ratio"] = None if plan.target_flops is None else plan.target_flops / max(1, plan.guide_flops)
    out["cost"] = alignment_cost(recipe, session.data.x_train.shape[0], plan)
    out["guide"] = session.guide_info
    out["data"] = session.data.summary()
    out["schedule"] = recipe.schedule.model_dump()
    out["similarity"] = recipe.similarity.kind
    out["param_ratio"] = plan.target_params / max(1, plan.guide_params)
    return out


MANY_STAGES = 24  # above this, inspect suggests grouping stages (each stage is a pass over the training inputs)


def alignment_cost(recipe: Recipe, train_examples: int, plan) -> dict[str, Any]:
    """The alignment's size before any compute: stages × steps per stage (on the CPU's batch size; CUDA raises it),
    and, for an in-place plan of more than :data:`MANY_STAGES` stages with no ``group_depth``, the stage counts
    grouping would give. One stage per replaced module stays the default (the paper's schedule): grouping changes
    what each stage aligns, so it is the user's choice, made visible here."""
    cfg = recipe.align
    per_epoch = batches_per_epoch(train_examples, min(align_batch_size(recipe, torch.device("cpu")), train_examples))
    if cfg.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    epochs = cfg.auto.max_epochs if cfg.auto.enabled else cfg.epochs
    stages = len(plan.stages)
    cost: dict[str, Any] = {"stages": stages, "steps_per_stage": per_epoch * epochs,
                            "align_steps": stages * per_epoch * epochs, "epochs_are_a_cap": cfg.auto.enabled,
                            "blockwise": recipe.schedule.kind == "blockwise"}
    sched = recipe.schedule
    if recipe.target is None and stages > MANY_STAGES and sched.group_depth is None and sched.kind != "joint":
        paths = plan.paths
        align_at = {e.path: e.aligned_at for e in plan.entries}
        cost["grouped"] = {depth: len(build_stages(paths, sched.kind, sched.order, depth, align_at, plan.align_order))
                           for depth in (1, 2, 3)}
    return cost
