"""The replacement plan: plain data, built before anything is cut.

:func:`build_plan` resolves the recipe's rules against the guide, runs one dry
forward on a sample to learn every module's shapes and execution order, checks
that each claimed module can take its replacement, and counts parameters
(replacements are instantiated on the ``meta`` device, so planning a huge
target costs no memory). ``inspect`` prints the plan; ``convert`` applies it
stage by stage with :func:`replace_module`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.models.cost import count_params
from theseus_cli.models.hooks import trace_shapes
from theseus_cli.shapes import ShapeRecord
from theseus_cli.surgery.matching import resolve_matches
from theseus_cli.config.recipe import Recipe, RuleConfig
from theseus_cli.replacements import IOShapes, get_replacement
from theseus_cli.surgery.schedule import Stage, build_stages
from theseus_cli.batch import run_model


@dataclass
class PlanEntry:
    """One module to replace."""

    path: str
    module_type: str
    rule: int
    replacement: str
    params: dict[str, Any]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    guide_params: int
    target_params: int
    output_arity: int | None = None  # the old module's output: None = tensor, n = tuple of n
    align_path: str | None = None  # where its output is aligned (None: at ``path``; see RuleConfig.align_up)

    @property
    def aligned_at(self) -> str:
        return self.align_path or self.path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlanEntry":
        data = dict(data)
        data["input_shape"] = tuple(data["input_shape"])
        data["output_shape"] = tuple(data["output_shape"])
        return cls(**data)


@dataclass
class ModuleRow:
    """One row of the ``inspect`` table (leaf modules and claimed modules)."""

    path: str
    module_type: str
    output_shape: tuple[int, ...] | None
    params: int
    rule: int | None = None
    becomes: str | None = None
    becomes_params: dict[str, Any] | None = None
    target_params: int | None = None


@dataclass
class Plan:
    input_shape: tuple[int, ...]
    entries: list[PlanEntry]  # in execution order
    rows: list[ModuleRow]
    guide_params: int
    target_params: int
    stages: list[Stage] = field(default_factory=list)
    align_order: dict[str, int] = field(default_factory=dict)  # alignment point → execution position

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists), as ``inspect --json`` prints it."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    @property
    def align_points(self) -> list[str]:
        """Distinct alignment points, in execution order (each stage's ``aligned`` is drawn from these)."""
        seen: list[str] = []
        for stage in self.stages:
            seen += [p for p in stage.aligned if p not in seen]
        return sorted(seen, key=self.align_order.__getitem__)


def build_replacement(entry: PlanEntry, old: nn.Module) -> nn.Module:
    replacement = get_replacement(entry.replacement)
    params = replacement.params_model.model_validate(entry.params)
    return replacement.build(old, params, IOShapes(entry.input_shape, entry.output_shape, entry.output_arity))


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Swap the submodule at ``path`` for ``new`` (get_submodule + setattr)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def apply_entries(model: nn.Module, entries: list[PlanEntry]) -> list[nn.Module]:
    """Replace each entry's module in ``model`` (in place); return the new modules."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    new_modules = []
    for entry in entries:
        new = build_replacement(entry, model.get_submodule(entry.path)).to(device)
        replace_module(model, entry.path, new)
        new_modules.append(new)
    return new_modules


def dry_trace(model: nn.Module, sample, name: str) -> dict[str, ShapeRecord]:
    """One forward of ``model`` in eval mode without gradients, traced (``hooks.trace_shapes``); a failure is a MatchError."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), trace_shapes(model) as info:
            run_model(model, sample)
    except Exception as exc:
        raise MatchError(f"dry forward of the {name} on an input of shape {tuple(sample.shape)} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    return info


def build_plan(guide: nn.Module, recipe: Recipe, sample) -> Plan:
    """Resolve rules, trace shapes on ``sample`` (a batch of ≥1 inputs: tensor or token batch), check and count."""
    matches = resolve_matches(guide, recipe.replace)
    info = dry_trace(guide, sample, "guide")

    problems: list[str] = []
    entries: list[PlanEntry] = []
    for match in matches:
        module = guide.get_submodule(match.path)
        rule: RuleConfig = recipe.replace[match.rule]
        rec = info.get(match.path)
        replacement = get_replacement(rule.with_)
        reason = replacement.check_accepts(module)
        if rec is None:
            reason = reason or "never runs in the forward pass"
        elif rec.calls > 1:
            reason = reason or f"runs {rec.calls} times per forward pass (shared module)"
        else:
            reason = reason or replacement.check_call(rec)
        if reason:
            problems.append(f"module '{match.path}' (replace[{match.rule}]): {reason}")
            continue
        align_path, why = _align_point(match.path, rule.align_up, info)
        if why:
            problems.append(f"module '{match.path}' (replace[{match.rule}].align_up): {why}")
            continue
        entry = PlanEntry(match.path, type(module).__name__, match.rule, rule.with_, dict(rule.params),
                          rec.input, rec.output, count_params(module), 0, rec.output_arity, align_path)
        with torch.device("meta"):
            entry.target_params = count_params(build_replacement(entry, module))
        entries.append(entry)
    if problems:
        raise MatchError("; ".join(problems))
    entries.sort(key=lambda e: info[e.path].order)

    by_path = {e.path: e for e in entries}
    rows: list[ModuleRow] = []
    inside_claimed = lambda p: any(p.startswith(c + ".") for c in by_path)  # noqa: E731
    for path, module in guide.named_modules():
        if not path or inside_claimed(path):
            continue
        if path not in by_path and any(True for _ in module.children()):
            continue
        rec = info.get(path)
        row = ModuleRow(path, type(module).__name__, rec.output if rec else None, count_params(module))
        if path in by_path:
            e = by_path[path]
            row.rule, row.becomes, row.becomes_params, row.target_params = e.rule, e.replacement, e.params, e.target_params
        rows.append(row)

    guide_params = count_params(guide)
    target_params = guide_params - sum(e.guide_params for e in entries) + sum(e.target_params for e in entries)
    sched = recipe.schedule
    align_order = {e.aligned_at: info[e.aligned_at].order for e in entries}
    stages = build_stages([e.path for e in entries], sched.kind, sched.order, sched.group_depth,
                          {e.path: e.aligned_at for e in entries}, align_order)
    return Plan(tuple(sample.shape[1:]), entries, rows, guide_params, target_params, stages, align_order)


def _align_point(path: str, up: int, info: dict[str, ShapeRecord]) -> tuple[str | None, str | None]:
    """(alignment path or None for the module itself, problem or None) for ``align_up`` levels above ``path``."""
    if up == 0:
        return None, None
    parts = path.split(".")
    if up >= len(parts):
        return None, f"{up} levels up from a path of {len(parts)} components leaves no module"
    target = ".".join(parts[:-up])
    rec = info.get(target)
    if rec is None or rec.output is None:
        return None, f"'{target}' does not run or returns no tensor"
    if rec.calls > 1:
        return None, f"'{target}' runs {rec.calls} times per forward pass"
    return target, None
