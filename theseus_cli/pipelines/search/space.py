"""The search space made concrete on the guide: groups of modules, the alternatives that fit each, every
architecture they combine into, and the candidates (architecture × method) phase 2 tries.

Each rule of ``space.rules`` is matched against the guide like a recipe rule; its modules are split into groups
(``groups.depth``/``size``) that choose independently. Each alternative is tried on each group with the planner
itself (:func:`theseus_cli.surgery.plan.build_plan`, one dry forward): an alternative that does not fit every module
of a group is left out of that group's choices, with the reason, and one that fits no group at all is an error, as
is a space with nothing to choose. Architectures are the product of the groups' choices, less the all-``keep`` one
(that is the guide) and those where two rules would replace nested modules (a dropped block and a convolution
inside it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from pydantic import ValidationError

from theseus_cli.config.errors import problem
from theseus_cli.config.recipe import Recipe, RuleConfig
from theseus_cli.config.search import KEEP, Alternative, SearchConfig, SearchRule
from theseus_cli.errors import MatchError, RecipeError
from theseus_cli.surgery.matching import rule_matches
from theseus_cli.surgery.plan import build_plan


@dataclass(frozen=True)
class Choice:
    """One concrete alternative: ``keep`` or a replacement with one value for each of its params."""

    replacement: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def keep(self) -> bool:
        return self.replacement == KEEP

    @property
    def label(self) -> str:
        if not self.params:
            return self.replacement
        return f"{self.replacement}(" + ",".join(f"{k}={v}" for k, v in self.params) + ")"


@dataclass
class Group:
    rule: int
    name: str
    paths: list[str]
    choices: list[Choice] = field(default_factory=list)  # keep first when offered
    excluded: dict[str, str] = field(default_factory=dict)  # choice label → why it does not fit


@dataclass(frozen=True)
class Architecture:
    """One pick per group (indices into each group's choices) and the recipe rules it stands for."""

    picks: tuple[int, ...]
    rules: tuple[str, ...]  # JSON of each RuleConfig dict, so the architecture is hashable and plain data
    label: str

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.rules).encode()).hexdigest()[:16]

    def replace_rules(self) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self.rules]


@dataclass
class SearchSpace:
    groups: list[Group]
    architectures: list[Architecture]
    overlapping: int  # combinations refused because two rules would replace nested modules

    def summary(self) -> dict[str, Any]:
        return {"groups": [{"name": g.name, "rule": g.rule, "modules": len(g.paths),
                            "choices": [c.label for c in g.choices], "excluded": g.excluded} for g in self.groups],
                "architectures": len(self.architectures), "overlapping_combinations": self.overlapping}


def expand(alternative: Alternative) -> list[Choice]:
    """One :class:`Choice` per combination of the alternative's list-valued params."""
    if alternative.with_ == KEEP:
        return [Choice(KEEP)]
    keys = sorted(alternative.params)
    values = [v if isinstance(v, list) else [v] for v in (alternative.params[k] for k in keys)]
    return [Choice(alternative.with_, tuple(zip(keys, combo))) for combo in itertools.product(*values)]


def split_groups(paths: list[str], rule: SearchRule) -> list[tuple[str, list[str]]]:
    """(name, paths) of each group, in module order: by the first ``depth`` path components, ``size`` at a time."""
    if rule.groups.depth is None:
        return [("all", paths)] if paths else []
    keyed: dict[str, list[str]] = {}
    for path in paths:
        keyed.setdefault(".".join(path.split(".")[: rule.groups.depth]), []).append(path)
    keys, size = list(keyed), rule.groups.size
    out = []
    for start in range(0, len(keys), size):
        chunk = keys[start:start + size]
        name = chunk[0] if len(chunk) == 1 else f"{chunk[0]}..{chunk[-1]}"
        out.append((name, [p for k in chunk for p in keyed[k]]))
    return out


def rule_config(rule: SearchRule, paths: list[str], choice: Choice) -> dict[str, Any]:
    return {"match": list(paths), "with": choice.replacement, "params": dict(choice.params), "align_up": rule.align_up}


def _fit(guide: nn.Module, base: Recipe, sample, rule_dict: dict[str, Any], where: str) -> str | None:
    """Why the rule does not fit the guide (None if it does); a params problem is a RecipeError at ``where``."""
    try:
        rule = RuleConfig.model_validate(rule_dict)
    except ValidationError as exc:
        raise RecipeError("; ".join(f"{where}.{problem(e, RuleConfig, ())}" for e in exc.errors())) from None
    try:
        build_plan(guide, base.model_copy(update={"replace": [rule]}), sample)
    except MatchError as exc:
        return str(exc)
    return None


def build_space(search: SearchConfig, base: Recipe, guide: nn.Module, sample, source: str) -> SearchSpace:
    """Groups, their fitting choices and the architectures (see the module docstring); errors name ``source``."""
    modules = [(p, m) for p, m in guide.named_modules() if p]
    groups: list[Group] = []
    problems: list[str] = []
    for r, rule in enumerate(search.space.rules):
        probe = RuleConfig.model_validate({"match": rule.match, "ignore": rule.ignore, "with": "identity"})
        hits = [p for p, m in modules if rule_matches(probe, p, m)]
        if not hits:
            problems.append(f"space.rules[{r}]: match {', '.join(map(repr, rule.match))} matched no module of the guide")
            continue
        fitted: dict[int, bool] = {}
        reasons: dict[int, str] = {}
        for name, paths in split_groups(hits, rule):
            group = Group(r, name, paths)
            for a, alternative in enumerate(rule.with_):
                for choice in expand(alternative):
                    if choice.keep:
                        group.choices.append(choice)
                        continue
                    why = _fit(guide, base, sample, rule_config(rule, paths, choice), f"{source}: space.rules[{r}].with[{a}]")
                    if why is None:
                        group.choices.append(choice)
                        fitted[a] = True
                    else:
                        group.excluded[choice.label] = why
                        reasons.setdefault(a, why)
            groups.append(group)
        for a, alternative in enumerate(rule.with_):
            if alternative.with_ != KEEP and not fitted.get(a):
                problems.append(f"space.rules[{r}].with[{a}]: {alternative.with_} fits no module the rule matches "
                                f"({reasons.get(a, 'no module')})")
    if problems:
        raise MatchError(f"{source}: " + "; ".join(problems))
    return _combine(groups, search, source)


def _combine(groups: list[Group], search: SearchConfig, source: str) -> SearchSpace:
    size = 1
    for g in groups:
        size *= len(g.choices)
    if size - 1 > search.space.max_architectures:
        raise RecipeError(f"{source}: the space holds {size - 1:,} architectures, more than "
                          f"space.max_architectures ({search.space.max_architectures}); each is exported and timed in "
                          "phase 1: offer fewer alternatives or coarser groups, or raise space.max_architectures")
    archs, overlapping = [], 0
    for picks in itertools.product(*[range(len(g.choices)) for g in groups]):
        chosen = [(g, g.choices[i]) for g, i in zip(groups, picks) if not g.choices[i].keep]
        if not chosen:
            continue
        claimed = [p for g, _ in chosen for p in g.paths]
        if any(a != b and b.startswith(a + ".") for a in claimed for b in claimed):
            overlapping += 1
            continue
        rules = tuple(json.dumps(rule_config(search.space.rules[g.rule], g.paths, c), sort_keys=True) for g, c in chosen)
        archs.append(Architecture(picks, rules, ", ".join(f"{g.name}:{c.label}" for g, c in chosen)))
    if not archs:
        raise RecipeError(f"{source}: the space is empty: every group can only keep its modules (add an alternative "
                          "that fits, or check the excluded ones with theseus inspect)")
    return SearchSpace(groups, archs, overlapping)
