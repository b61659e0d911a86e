"""``theseus inspect``: the replacement plan as data, before anything is cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from theseus_cli.plan import build_plan
from theseus_cli.recipe import Recipe
from theseus_cli.session import open_session


def inspect_guide(recipe: Recipe, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Build the plan for ``recipe`` on its guide and return it as plain data."""
    session = open_session(recipe, checkpoint, "cpu")
    plan = build_plan(session.guide, recipe, session.data.x_train[:2])
    out = plan.to_dict()
    out["guide"] = session.guide_info
    out["data"] = session.data.summary()
    out["schedule"] = recipe.schedule.model_dump()
    out["similarity"] = recipe.similarity.kind
    out["param_ratio"] = plan.target_params / max(1, plan.guide_params)
    return out
