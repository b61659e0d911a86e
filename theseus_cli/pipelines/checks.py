"""Checks a conversion makes before any training, and small pieces of its report."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from theseus_cli.config.recipe import Recipe
from theseus_cli.errors import MatchError, RecipeError
from theseus_cli.tasks import Task
from theseus_cli.training import memory
from theseus_cli.training.distributed import Dist, current_dist
from theseus_cli.training.runtime import align_batch_size
from theseus_cli.training.session import Session


def retention(task: Task, guide: float, target: float) -> float | None:
    """How much of the guide's quality the target keeps: target/guide, or guide/target where lower is better
    (perplexity), so 1.0 is always "as good as the guide"."""
    if not guide or not target:
        return None
    return target / guide if task.higher_is_better else guide / target


def check_overrides(overrides, stages, matches) -> None:
    """A per-stage override that selects no stage is an error, like a rule that matches nothing."""
    problems = []
    for i, o in enumerate(overrides):
        if o.stage is not None and o.stage > len(stages):
            problems.append(f"align.overrides[{i}].stage: {o.stage}, but the plan has {len(stages)} stages")
        if o.match is not None and not any(matches(o.match, p) for st in stages for p in st.introduced):
            problems.append(f"align.overrides[{i}].match: {o.match!r} matches no replaced module")
    if problems:
        raise MatchError("; ".join(problems))


def check_fits(session: Session, guide: torch.nn.Module, plan, baseline: bool = False) -> None:
    """Before any work: the target can be trained on the device, and each batch size fits (lower bounds, see
    :mod:`theseus_cli.training.memory`). A plan of 700 billion parameters is refused here, not by the allocator."""
    recipe, data, dev = session.recipe, session.data, session.device
    biggest = max(plan.entries, key=lambda e: e.target_params, default=None)
    hint = (f" (the largest replacement: module '{biggest.path}' → {biggest.replacement} with {biggest.target_params:,} "
            f"parameters, replace[{biggest.rule}])" if biggest is not None else "")
    if recipe.finetune.checkpointing and recipe.target is None:
        from theseus_cli.training.checkpointing import checked_blocks

        checked_blocks(guide)  # before any work, not after the alignment
    trained, frozen = trained_params(recipe, guide, plan, baseline)
    shards = current_dist().world if recipe.runtime.fsdp else 1  # sharded: each rank holds 1/N of the state
    memory.require_trainable(trained // shards, dev, "the target" + hint + (f", 1/{shards} of it per rank" if shards > 1 else ""),
                             frozen // shards)
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
    memory.require_batches(guide, data.x_train[:1].to(dev), {
        "align.batch_size": min(align_batch_size(recipe, dev), n_train),
        "data.batch_size": min(recipe.data.batch_size, n_train),
        "data.eval_batch_size": min(recipe.data.eval_batch_size, n_test)}, dev)


def trained_params(recipe: Recipe, guide: torch.nn.Module, plan, baseline: bool = False) -> tuple[int, int]:
    """(parameters trained, frozen parameters held beside the guide) of the target: all of them are trained,
    except under ``finetune.peft``, where the replacements and the adapters train and the kept weights stay frozen,
    shared with the guide (:func:`theseus_cli.pipelines.convert.hybrid_start`): no second copy, so none extra; and
    where a replace recipe does not fine-tune (``finetune.epochs: 0``) and trains no ``baseline``, whose alignment
    trains the replacements alone."""
    peft = recipe.finetune.peft
    replace = recipe.target is None
    if replace and peft is None and recipe.finetune.epochs == 0 and not baseline:
        return sum(e.target_params for e in plan.entries), 0
    if peft is None or not replace:
        return plan.target_params, 0
    from theseus_cli.training.lora import adapter_params, checked_targets

    replaced = [e.path for e in plan.entries]
    new = sum(e.target_params for e in plan.entries)
    adapters = adapter_params(guide, checked_targets(guide, peft, replaced), peft.rank)
    return new + adapters, 0


def check_world(session: Session, dist: Dist) -> None:
    """Under torchrun every rank needs at least one sample of every batch it shards."""
    if not dist.enabled:
        return
    recipe, n = session.recipe, session.data.x_train.shape[0]
    for field, size in (("data.batch_size", recipe.data.batch_size), ("align.batch_size", align_batch_size(recipe, session.device))):
        if min(size, n) < dist.world:
            raise RecipeError(f"{field}: batches of {min(size, n)} cannot be split over {dist.world} processes")


def plan_report(plan, recipe: Recipe) -> dict[str, Any]:
    stages = [asdict(st) for st in plan.stages]
    if recipe.target is None:
        return {"kind": "replace", "entries": [asdict(e) for e in plan.entries], "stages": stages}
    return {"kind": "transfer", "target": {"arch": recipe.target.arch, "kwargs": recipe.target.kwargs},
            "pairs": [asdict(p) for p in plan.pairs], "stem": plan.stem, "head": plan.head, "inherited": plan.inherited,
            "flops": {"guide": plan.guide_flops, "target": plan.target_flops}, "stages": stages}
