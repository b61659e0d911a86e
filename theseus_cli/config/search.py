"""Search recipe: a base recipe, the space of targets and methods around it, the goals, and the budget.

A search file names a **base** recipe (``base:``, relative to the search file) and says what may vary::

    base: edge_resnet18_separable.yaml
    space:
      rules:                                   # replace the base's own `replace` rules
        - match: re:layer\\d\\.\\d\\.conv\\d
          groups: {depth: 1}                   # layer1, layer2, … choose independently
          with:
            - keep
            - separable_conv
            - {with: lowrank_conv, params: {rank_ratio: [0.25, 0.5]}}
      methods: [not, not-teacher, progressive-distill, distill]
    goals: {max_latency_ms: 2.0, runtime: {batch: 1, threads: 1, precision: fp32}}

Why a separate file naming a base: the shipped hand-written recipes stay the base (one source for data, budgets
and training settings), a search never hides inside a recipe that ``convert`` would run differently, and the
base is validated exactly as ``convert`` validates it. Everything a trial runs is the base recipe with its
``replace`` rules, its method's settings and its budget fraction exchanged (:mod:`theseus_cli.pipelines.search`).

A list value inside an alternative's ``params`` is a list of alternatives (``rank_ratio: [0.25, 0.5]`` is two
choices); a parameter that is itself a list is written as a list of lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union  # noqa: F401

from pydantic import Field, ValidationError, field_validator, model_validator

from theseus_cli.config.base import StrictModel, check_patterns
from theseus_cli.config.errors import format_validation_error
from theseus_cli.config.reader import read_yaml
from theseus_cli.config.recipe import Recipe, SimilarityName, load_recipe
from theseus_cli.errors import RecipeError
from theseus_cli.replacements import get_replacement

KEEP = "keep"
MethodName = Literal["not", "not-teacher", "progressive-distill", "distill", "guide-init-distill", "scratch"]
METHODS: tuple[str, ...] = MethodName.__args__  # type: ignore[attr-defined]


class Alternative(StrictModel):
    """One thing a rule's modules may become: ``keep`` (unchanged), or a replacement with its params, where a list
    value stands for one alternative per item."""

    with_: str = Field(alias="with", description="'keep', 'identity' (drop a shape-preserving module) or a replacement")
    params: dict[str, Any] = Field(default_factory=dict, description="the replacement's params; a list: alternatives")

    @model_validator(mode="after")
    def _known(self) -> "Alternative":
        if self.with_ == KEEP:
            if self.params:
                raise ValueError("params: 'keep' takes no params")
            return self
        get_replacement(self.with_)  # ValueError listing the valid names
        return self


class Groups(StrictModel):
    """How a rule's matched modules are split into groups that choose independently: modules sharing the first
    ``depth`` path components form one group (ResNet's ``layer1``, ``layer2``, …; ``depth: 3`` on BERT's
    ``encoder.layer.4.attention`` gives each block), then ``size`` consecutive groups are merged (ranges of blocks)."""

    depth: Optional[int] = Field(None, ge=1, description="path components that name a group (none: one group for the rule)")
    size: int = Field(1, ge=1, description="consecutive groups merged into one choice")


class SearchRule(StrictModel):
    match: Union[str, list[str]] = Field(description="the same grammar as a recipe's replace[].match")
    ignore: list[str] = Field(default_factory=list)
    align_up: int = Field(0, ge=0, description="as in a recipe's rule")
    groups: Groups = Field(default_factory=Groups)
    with_: list[Alternative] = Field(alias="with", min_length=1, description="the alternatives ('keep', a "
                                     "replacement name, or {with, params})")

    @field_validator("match")
    @classmethod
    def _match(cls, v: Union[str, list[str]]) -> list[str]:
        return check_patterns(v, "match")

    @field_validator("with_", mode="before")
    @classmethod
    def _alternatives(cls, v: Any) -> Any:
        return [{"with": a} if isinstance(a, str) else a for a in v] if isinstance(v, list) else v


class MethodChoice(StrictModel):
    method: MethodName = Field(description="not: NoT; not-teacher: NoT with the guide as teacher in fine-tuning; "
                               "progressive-distill: stages trained on the output KL; distill: the same target "
                               "from fresh weights distilled from the guide, no alignment; guide-init-distill: the "
                               "same with the guide's weights outside the replacements; scratch: the same target "
                               "from fresh weights on the labels alone")
    similarity: list[SimilarityName] = Field(default_factory=list, description="not / not-teacher: the similarities "
                                             "to try (none: the base recipe's)")

    @model_validator(mode="after")
    def _similarity(self) -> "MethodChoice":
        if self.similarity and self.method not in ("not", "not-teacher"):
            raise ValueError(f"similarity: method {self.method} aligns no activations; only not and not-teacher take one")
        return self


class Space(StrictModel):
    rules: list[SearchRule] = Field(min_length=1, description="replace the base recipe's replace rules")
    methods: list[MethodChoice] = Field(default_factory=lambda: [MethodChoice(method="not")], min_length=1,
                                        description="a method name, or {method, similarity}")
    max_architectures: int = Field(256, ge=1, description="refuse a space with more architectures than this (each is "
                                   "exported and timed in phase 1)")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        return [{"method": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


class RuntimeGoal(StrictModel):
    """Where latency and file size are measured: ONNX Runtime's CPU provider."""

    engine: Literal["onnxruntime"] = "onnxruntime"
    batch: int = Field(1, ge=1)
    threads: int = Field(1, ge=1, description="intra-op threads of the session")
    precision: Literal["fp32", "int8"] = Field("fp32", description="int8: the candidates' (and the guide's) int8 files")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="the ONNX exporter of phase 1 and of the winner's files, as theseus export --exporter "
        "(torchscript is the quicker one for a large space)")


class Goals(StrictModel):
    max_latency_ms: Optional[float] = Field(None, gt=0, description="median latency on the runtime")
    max_latency_ratio: Optional[float] = Field(None, gt=0, description="latency as a fraction of the guide's fp32 "
                                               "file's, timed alternating with it (0.5: twice as fast); unlike "
                                               "max_latency_ms it holds on a faster or slower machine")
    max_params: Optional[int] = Field(None, ge=1)
    max_file_mb: Optional[float] = Field(None, gt=0, description="the ONNX file of the runtime's precision, MB = 10^6 bytes")
    min_retention: Optional[float] = Field(None, gt=0, description="validation metric kept, as --min-retention")
    latency_margin: float = Field(
        0.15, ge=0, lt=1, description="phase 1 keeps an architecture only if its timed latency (ms or ratio) is at "
        "most (1 - latency_margin) × the goal; the winner's final file is gated at the goal itself. Timings on a "
        "shared CPU move by more than 10 % between runs (the same ResNet-18 architecture timed ×0.43 and ×0.46 the "
        "guide in phase 1 and ×0.51 and ×0.57 on its final file), so a candidate at the goal is a coin flip")
    runtime: RuntimeGoal = Field(default_factory=RuntimeGoal)


class Budget(StrictModel):
    """Phase 2's fidelities: rung r runs ``min_fraction · reduction_factor^r`` of the base recipe's alignment and
    fine-tuning steps, up to 1 (the full budget)."""

    min_fraction: float = Field(0.25, gt=0, le=1)
    reduction_factor: int = Field(4, ge=2, description="η: a rung keeps the best 1/η of the trials that reach it")
    pruner: Literal["successive-halving", "hyperband"] = "successive-halving"
    trials: Optional[int] = Field(None, ge=1, description="candidates tried (none: every feasible one, up to the "
                                  "cost cap's worth)")
    max_cost: float = Field(4.0, gt=0, description="stop promoting once this many full-conversion equivalents "
                            "(gradient steps) are spent")
    incumbent: bool = Field(True, description="grid successive halving: the base recipe's own candidate (its "
                            "replacements and method), where the space holds it, is never pruned and reaches the full "
                            "budget, so the winner is chosen against what the user would run without a search")

    def fractions(self) -> list[float]:
        out, f = [], self.min_fraction
        while f < 1 - 1e-9:
            out.append(f)
            f *= self.reduction_factor
        return out + [1.0]


class Validation(StrictModel):
    """The split trials are ranked on, carved from the training data (the test split never chooses)."""

    size: int = Field(1000, ge=10, description="training inputs held out (at most a fifth of the training split)")
    rank_by: Literal["auto", "labels", "guide-agreement"] = Field(
        "auto", description="labels: the task metric (held-out labelled inputs, at most a fifth of them where labels "
        "are scarce); guide-agreement: agreement with the guide's predictions on held-out unlabelled inputs (auto: "
        "labels when a fifth of the labels is at least 100 inputs, else guide-agreement)")
    choose: Literal["one-se", "best"] = Field(
        "one-se", description="the winner among the feasible candidates: best: the best validation metric; one-se: "
        "where the metric is a share of the validation inputs (accuracy, agreement), the fastest candidate within one "
        "standard error of the best, sqrt(p(1-p)/n) (other metrics: the best)")


class SearchConfig(StrictModel):
    base: str = Field(description="the recipe the space varies, relative to this file")
    space: Space
    goals: Goals = Field(default_factory=Goals)
    budget: Budget = Field(default_factory=Budget)
    validation: Validation = Field(default_factory=Validation)
    sampler: Literal["grid", "tpe", "random"] = Field("grid", description="grid: each candidate once, in a seeded "
                                                      "random order; tpe / random: Optuna's samplers")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _trials_for_samplers(self) -> "SearchConfig":
        if self.sampler != "grid" and self.budget.trials is None:
            raise ValueError(f"sampler: {self.sampler} proposes candidates without end; set budget.trials (grid tries "
                             "each feasible candidate once)")
        return self


def is_search_file(path: str | Path) -> bool:
    """Whether ``path`` holds a search (a mapping with ``base`` and ``space``) rather than a recipe."""
    try:
        data = read_yaml(Path(path))
    except RecipeError:
        return False
    return isinstance(data, dict) and "space" in data and "base" in data


def load_search(path: str | Path) -> tuple[SearchConfig, Recipe]:
    """The search file and its base recipe, both validated; :class:`RecipeError` naming every problem."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping (base, space, goals, budget)")
    try:
        search = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(str(path), exc, SearchConfig, [])) from None
    base_path = (path.parent / search.base).resolve()
    base = load_recipe(base_path)
    if base.target is not None:
        raise RecipeError(f"{path}: base: {search.base} rebuilds a target network (target:); a search varies in-place "
                          "replace rules, so its base must be a replace recipe")
    return search, base
