"""``theseus inspect``: the replacement plan as data, before anything is cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from theseus_cli.models.build import build_model
from theseus_cli.surgery.plan import build_plan
from theseus_cli.config.recipe import Recipe
from theseus_cli.seeds import Seeds
from theseus_cli.training.session import check_classes, open_session
from theseus_cli.surgery.transfer import build_transfer_plan


def inspect_guide(recipe: Recipe, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Build the plan for ``recipe`` on its guide and return it as plain data (``kind``: replace or transfer)."""
    session = open_session(recipe, checkpoint, "cpu", probe=False)
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
    out["guide"] = session.guide_info
    out["data"] = session.data.summary()
    out["schedule"] = recipe.schedule.model_dump()
    out["similarity"] = recipe.similarity.kind
    out["param_ratio"] = plan.target_params / max(1, plan.guide_params)
    return out
