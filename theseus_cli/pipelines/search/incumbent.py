"""The incumbent: the base recipe's own candidate, where the space holds it, never pruned.

A search is asked whether it beats what the user would run without it: the base recipe as written. Short rungs are a
biased judge of exactly that recipe when it aligns many stages: at 1/8 of the budget a 16-stage NoT conversion gets
5 alignment steps a stage, and the ResNet-18 search of docs/BENCHMARKS.md pruned the hand-written recipe at its
first rung (0.605 on validation) although at the full budget it beat every candidate the search promoted. So, with
``budget.incumbent: true`` (the default), the candidate whose architecture plans exactly the base recipe's
replacements and whose method is the base's own (NoT, with the teacher or not, with its similarity; or progressive
distillation) runs every rung like the others but is never pruned, so it reaches the full budget, and the winner is
chosen against it on the same validation split. Its later rungs are reserved out of the cap before the first rung,
and it takes no place from the others at a rung. Hyperband and the tpe / random samplers have no incumbent (their
pruners are Optuna's own).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

from theseus_cli.config.recipe import Recipe, RuleConfig
from theseus_cli.surgery.plan import build_plan

if TYPE_CHECKING:
    from theseus_cli.pipelines.search.pipeline import Candidate, Search


def base_method(base: Recipe) -> Optional[tuple[str, str]]:
    """The search method the base recipe itself runs, and its similarity (None: no method of the space runs it,
    e.g. a base that does not align)."""
    if base.align.epochs == 0 or base.start != "guide":
        return None
    if base.schedule.objective == "distill":
        return "progressive-distill", base.similarity.kind
    return ("not-teacher" if base.finetune.distill is not None else "not"), base.similarity.kind


def _replacements(guide, recipe: Recipe, sample) -> set[tuple]:
    plan = build_plan(guide, recipe, sample)
    return {(e.path, e.replacement, json.dumps(e.params, sort_keys=True), e.align_path) for e in plan.entries}


def find_incumbent(search: "Search") -> Optional["Candidate"]:
    """The feasible candidate that is the base recipe as written, or None."""
    method = base_method(search.base)
    if method is None or not search.search.budget.incumbent or search.search.sampler != "grid" \
            or search.search.budget.pruner != "successive-halving":
        return None
    guide, sample = search.screener.guide_cpu, search.session.data.x_train[:2].to("cpu")
    wanted = _replacements(guide, search.base, sample)
    planned: dict[str, set[tuple]] = {}
    for cand in search.candidates:
        if cand.method != method[0] or cand.similarity not in (None, method[1]):
            continue
        if cand.arch.digest not in planned:
            rules = [RuleConfig.model_validate(r) for r in cand.arch.replace_rules()]
            planned[cand.arch.digest] = _replacements(guide, search.base.model_copy(update={"replace": rules}), sample)
        if planned[cand.arch.digest] == wanted:
            return cand
    return None
