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
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.models.cost import count_flops, count_flops_by_module, count_params
from theseus_cli.models.hooks import input_moments, trace_shapes
from theseus_cli.shapes import ShapeRecord
from theseus_cli.surgery.matching import resolve_matches, unclaimed_instances
from theseus_cli.config.recipe import Recipe, RuleConfig
from theseus_cli.replacements import IOShapes, get_replacement, start_from_weights
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
    guide_flops: int | None = None  # FLOPs per example of the module, and of its replacement (None: not countable)
    target_flops: int | None = None

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
    flops: int | None = None  # per example
    target_flops: int | None = None


@dataclass
class Plan:
    input_shape: tuple[int, ...]
    entries: list[PlanEntry]  # in execution order
    rows: list[ModuleRow]
    guide_params: int
    target_params: int
    stages: list[Stage] = field(default_factory=list)
    align_order: dict[str, int] = field(default_factory=dict)  # alignment point → execution position
    guide_flops: int | None = None  # per example; the target's: the guide's with each entry's FLOPs exchanged
    target_flops: int | None = None
    unclaimed: list[dict] = field(default_factory=list)  # modules a rule names the class of, left unconverted

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


def _params(entry: PlanEntry):
    return get_replacement(entry.replacement).params_model.model_validate(entry.params)


def build_replacement(entry: PlanEntry, old: nn.Module, input_moment: torch.Tensor | None = None) -> nn.Module:
    return _build(entry, _params(entry), old, input_moment)


def _build(entry: PlanEntry, params, old: nn.Module, input_moment: torch.Tensor | None) -> nn.Module:
    """The entry's new module from its already validated ``params``."""
    shapes = IOShapes(entry.input_shape, entry.output_shape, entry.output_arity, input_moment)
    return get_replacement(entry.replacement).build(old, params, shapes)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Swap the submodule at ``path`` for ``new`` (get_submodule + setattr)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def apply_entries(model: nn.Module, entries: list[PlanEntry],
                  calibration: Callable[[int], Iterable] | None = None) -> list[nn.Module]:
    """Replace each entry's module in ``model`` (in place); return the new modules.

    ``calibration(n)`` yields batches of ``n`` training inputs: entries whose params want the second moment of their
    module's inputs (``init: activation_svd``) get it, measured on ``model`` as it is before this call (for a
    progressive conversion the hybrid, whose earlier replacements feed the new one). Without it they get none."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    params = {e.path: _params(e) for e in entries}
    wanted = {path: p.calibration for path, p in params.items() if getattr(p, "wants_input_moment", False)}
    moments = {}
    if wanted and calibration is not None and start_from_weights():
        moments = input_moments(model, list(wanted), calibration(max(wanted.values())))
    new_modules = []
    for entry in entries:
        new = _build(entry, params[entry.path], model.get_submodule(entry.path), moments.get(entry.path)).to(device)
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
    guide_flops, flops_at = count_flops_by_module(guide, sample[:1])

    problems: list[str] = []
    entries: list[PlanEntry] = []
    for match in matches:
        entry, problem = _plan_entry(guide, match, recipe.replace[match.rule], info, flops_at.get(match.path))
        if problem:
            problems.append(f"module '{match.path}' (replace[{match.rule}]{problem}")
        else:
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
        row = ModuleRow(path, type(module).__name__, rec.output if rec else None, count_params(module),
                        flops=flops_at.get(path, 0) if rec else None)
        if path in by_path:
            e = by_path[path]
            row.rule, row.becomes, row.becomes_params, row.target_params = e.rule, e.replacement, e.params, e.target_params
            row.target_flops = e.target_flops
        rows.append(row)

    guide_params = count_params(guide)
    target_params = guide_params - sum(e.guide_params for e in entries) + sum(e.target_params for e in entries)
    sched = recipe.schedule
    align_order = {e.aligned_at: info[e.aligned_at].order for e in entries}
    stages = build_stages([e.path for e in entries], sched.kind, sched.order, sched.group_depth,
                          {e.path: e.aligned_at for e in entries}, align_order)
    swapped = [(e.guide_flops, e.target_flops) for e in entries]
    target_flops = None if any(t is None for _, t in swapped) else guide_flops + sum(t - (g or 0) for g, t in swapped)
    return Plan(tuple(sample.shape[1:]), entries, rows, guide_params, target_params, stages, align_order,
                guide_flops, target_flops, unclaimed_instances(guide, recipe.replace, list(by_path)))


def _plan_entry(guide: nn.Module, match, rule: RuleConfig, info: dict[str, ShapeRecord], flops: int | None
                ) -> tuple[PlanEntry | None, str | None]:
    """The plan entry of one matched module, or why it cannot be replaced (as the tail of a message that starts
    with the module path and rule index: ``"): reason"`` or ``".align_up): reason"``)."""
    module = guide.get_submodule(match.path)
    rec = info.get(match.path)
    replacement = get_replacement(rule.with_)
    params = replacement.params_model.model_validate(rule.params)
    reason = replacement.check_accepts(module)
    if rec is None:
        reason = reason or "never runs in the forward pass"
    elif rec.calls > 1:
        reason = reason or f"runs {rec.calls} times per forward pass (shared module)"
    else:
        reason = reason or replacement.check_call(rec) or replacement.check_fit(
            module, params, IOShapes(rec.input, rec.output, rec.output_arity))
    if reason:
        return None, f"): {reason}"
    align_path, why = _align_point(match.path, rule.align_up, info)
    if why:
        return None, f".align_up): {why}"
    entry = PlanEntry(match.path, type(module).__name__, match.rule, rule.with_, dict(rule.params),
                      rec.input, rec.output, count_params(module), 0, rec.output_arity, align_path, flops)
    with torch.device("meta"):
        new = build_replacement(entry, module)
        entry.target_params = count_params(new)
        if replacement.interface == "tensor":
            reason = _shape_problem(new, rec)
        entry.target_flops = None if reason else _meta_flops(new, rec.input)
    return (None, f"): {reason}") if reason else (entry, None)


def _meta_flops(new: nn.Module, per_sample: tuple[int, ...]) -> int | None:
    """FLOPs per example of a replacement built on the meta device, on a meta input of the observed shape (for a
    sequence replacement: the hidden states alone); None where it cannot run that way."""
    try:
        return count_flops(new, torch.empty((1, *per_sample), device="meta"))
    except Exception:  # noqa: BLE001 — a cost we cannot count is shown as unknown, never fatal
        return None


def _shape_problem(new: nn.Module, rec: ShapeRecord) -> str | None:
    """Why the built replacement, run on a meta tensor of the observed input shape, does not give the observed
    output shape (a subclass whose forward departs from its attributes, such as timm's Conv2dSame, which pads
    at run time), or None."""
    try:
        got = tuple(new(torch.empty((2, *rec.input), device="meta")).shape[1:])
    except Exception as exc:  # noqa: BLE001 — any failure of the stand-in is a refusal with its reason
        return f"the replacement cannot run on its input of shape {rec.input}: {type(exc).__name__}: {exc}"
    if got != tuple(rec.output):
        return (f"the replacement gives shape {got} where the module gives {tuple(rec.output)} (its forward does "
                f"not follow its own stride/padding attributes)")
    return None


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
