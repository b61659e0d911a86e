"""Recipe: the YAML file that says what to convert and how.

Every section is a pydantic v2 model with ``extra="forbid"`` so a typo is an
error, and closed option sets are ``Literal`` so the error lists the valid
choices. :func:`load_recipe` reports *all* problems of a file at once, each with
its location (``replace[0].params.rank: ...``), before any model is built.
"""

from __future__ import annotations

import warnings

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from theseus_cli.data.sources import DATA_SOURCES, text_sources
from theseus_cli.config.base import StrictModel, check_pattern, check_patterns
from theseus_cli.config.errors import format_validation_error, problem
from theseus_cli.config.phases import (AlignConfig, BaselineConfig, BNRecalConfig, FinetuneConfig, RuntimeConfig,
                                       ScheduleConfig)
from theseus_cli.errors import RecipeError, TheseusWarning
from theseus_cli.models.sources import MODEL_SOURCES
from theseus_cli.config.reader import read_yaml
from theseus_cli.replacements import get_replacement
from theseus_cli.similarity import SIMILARITIES, min_batch

# Closed option sets generated from the registries (theseus_cli.data, .models, .similarity), so a recipe error
# lists exactly what this installation offers
DataSourceName = Literal[tuple(DATA_SOURCES)]  # type: ignore[valid-type]
SimilarityName = Literal[tuple(SIMILARITIES)]  # type: ignore[valid-type]
_MODULE_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_SEED = 2**31 - 1  # numpy and torch both take it, with room for the offsets the run's random streams add


def check_arch_spec(spec: str) -> str:
    """``torchvision:<name>``, ``timm:<name>``, ``hf:<model type or directory>`` or ``package.module:function``."""
    if ":" not in spec:
        raise ValueError(f"arch {spec!r} must be 'torchvision:<name>', 'timm:<name>', 'hf:<model type or dir>' or 'module:function'")
    prefix, name = spec.split(":", 1)
    if prefix in MODEL_SOURCES:
        if not name:
            raise ValueError(f"arch {spec!r} names no model after '{prefix}:'")
    elif not _MODULE_FN.match(spec):
        raise ValueError(f"arch {spec!r} is not 'torchvision:<name>', 'timm:<name>', 'hf:<model type or dir>' or 'module:function'")
    return spec


class KeyRename(StrictModel):
    """One rule of ``guide.key_map``: a regex substitution applied to every checkpoint key (in list order)."""

    match: str = Field(description="'re:<regex>' searched in each key (anchor it with ^ to rename a prefix)")
    to: str = Field(description="the replacement; \\1… refer to the pattern's groups")

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        if not v.startswith("re:"):
            raise ValueError(f"{v!r} must be a 're:<regex>' pattern")
        return check_pattern(v)


class GuideConfig(StrictModel):
    arch: str = Field(description="torchvision:<name>, timm:<name>, hf:<model type | dir | pkg:package/subdir> or package.module:function")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the constructor")
    checkpoint: Optional[str] = Field(None, description="state dict (.pt/.pth/.safetensors), relative to the recipe file, "
                                      "or pkg:<package>/<file> inside an installed package; none = untrained guide")
    key_map: list[KeyRename] = Field(default_factory=list, description="renames checkpoint keys before loading "
                                     "(weights from another codebase), rule after rule")
    ignore_keys: list[str] = Field(default_factory=list, description="'re:' patterns or exact keys allowed to be missing, "
                                   "unexpected or of another shape in the checkpoint (they keep their initial values)")
    head: Literal["keep", "reset"] = Field("keep", description="classification: keep the checkpoint's head, or reset it: "
                                           "drop its tensors and build it fresh for the data's classes, fitted as a "
                                           "linear probe on the labelled examples before conversion")
    head_module: Optional[str] = Field(None, description="head: reset: the head's module path (default: the last nn.Linear)")
    head_probe_steps: int = Field(500, ge=0, description="head: reset: Adam steps of the linear probe on the head's "
                                  "cached inputs (0: leave the new head random)")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return check_arch_spec(v)

    @field_validator("ignore_keys")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        for p in v:
            check_pattern(p)
        return v


class DataConfig(StrictModel):
    source: DataSourceName = "fashion-mnist"
    path: Optional[str] = Field(None, description="folder or file, for idx / npz / imagefolder / text")
    tokenizer: str = Field("gpt2", description="text: 'gpt2' (offline GPT-2 BPE), 'guide' (the hf: guide directory's tokenizer) or a tokenizer directory")
    sequence_length: int = Field(128, ge=2, description="text: tokens per sequence (causal-lm: chunk length; sentences: truncation)")
    image_size: Optional[int] = Field(None, ge=4, description="resize images to this square size")
    channels: Optional[Literal[1, 3]] = Field(None, description="convert to 1 (grey) or 3 (RGB) channels")
    canvas: Optional[int] = Field(None, ge=4, description="paste each image into a larger square canvas")
    placement: Literal["center", "random"] = Field("center", description="where on the canvas (random: fixed per image)")
    train_limit: Optional[int] = Field(None, ge=1, description="use a seeded subset of the training split")
    label_limit: Optional[int] = Field(None, ge=1, description="labelled examples for fine-tuning and baseline; alignment still sees all training inputs")
    test_limit: Optional[int] = Field(None, ge=1, description="use a seeded subset of the test split")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="seed of the subsets, splits and canvas placement; "
                                "default: the recipe's seed (benchmarks fix it to vary only the conversion's seed)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share where the source has no test split")
    batch_size: int = Field(256, ge=2)
    eval_batch_size: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        needs_path = DATA_SOURCES[self.source].needs_path
        if needs_path and not self.path:
            raise ValueError(f"path: source {self.source!r} needs a path")
        if not needs_path and self.path:
            raise ValueError(f"path: source {self.source!r} is built in and takes no path")
        if self.canvas is not None and self.image_size is not None and self.canvas < self.image_size:
            raise ValueError(f"canvas: {self.canvas} is smaller than image_size {self.image_size}")
        return self


class RuleConfig(StrictModel):
    """One replacement rule: which modules, what they become."""

    match: Union[str, list[str]] = Field(description="'re:<regex>' (fullmatch on the dotted path), an exact path, a class "
                                         "name (its subclasses too) or 'exact:<Class>' (that class only)")
    ignore: list[str] = Field(default_factory=list, description="patterns of the same grammar to leave alone")
    with_: str = Field(alias="with", description="replacement name")
    params: dict[str, Any] = Field(default_factory=dict)
    align_up: int = Field(0, ge=0, description="align the output of the module this many path levels above the "
                          "replaced one (0: the replaced module itself; 1 on a transformer's attention: its block)")

    @field_validator("match")
    @classmethod
    def _match(cls, v: Union[str, list[str]]) -> list[str]:
        return check_patterns(v, "match")

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        for p in v:
            check_pattern(p)
        return v

    @model_validator(mode="after")
    def _params(self) -> "RuleConfig":
        replacement = get_replacement(self.with_)  # ValueError lists valid names
        try:
            self.params = replacement.params_model.model_validate(self.params).model_dump()
        except ValidationError as exc:
            raise ValueError("; ".join(problem(e, replacement.params_model, ("params",)) for e in exc.errors())) from None
        return self


class MapEntry(StrictModel):
    """One alignment pair of an architecture transfer: a target module and the guide module(s) whose output it matches."""

    target: Union[str, list[str]] = Field(description="target module(s): exact path, class name or 're:' pattern, each "
                                          "matching exactly one module; several form a group trained together, the "
                                          "last of them aligned")
    guide: Union[str, list[str]] = Field(description="guide module(s), same grammar; their group's output is the output of "
                                                     "the last of them to run")

    @field_validator("target")
    @classmethod
    def _target(cls, v: Union[str, list[str]]) -> list[str]:
        return check_patterns(v, "target")

    @field_validator("guide")
    @classmethod
    def _guide(cls, v: Union[str, list[str]]) -> list[str]:
        return check_patterns(v, "guide")


class BlockLists(StrictModel):
    """Two block lists, split automatically: consecutive guide blocks are shared out evenly over the target blocks."""

    target: str = Field(description="pattern listing the target's blocks (e.g. BasicBlock)")
    guide: str = Field(description="pattern listing the guide's blocks (e.g. Bottleneck); with a 're:' capture group, "
                                   "blocks are split within each captured value (e.g. per ResNet stage)")

    @field_validator("target", "guide")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return check_pattern(v)


class TargetConfig(StrictModel):
    """A separate target network rebuilt block by block (architecture transfer, the paper's Appendix E.2)."""

    arch: str = Field(description="same spec forms as guide.arch")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    map: list[MapEntry] = Field(default_factory=list, description="explicit alignment pairs, in order")
    blocks: Optional[BlockLists] = Field(None, description="or: two block lists split evenly")
    inherit: bool = Field(True, description="copy guide weights of the same name and shape outside the mapped blocks "
                                            "(stem, embeddings, head) into the target before alignment")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return check_arch_spec(v)

    @model_validator(mode="after")
    def _one_map(self) -> "TargetConfig":
        if bool(self.map) == (self.blocks is not None):
            raise ValueError("give exactly one of map (explicit pairs) or blocks (automatic even split)")
        return self


class SimilarityConfig(StrictModel):
    kind: SimilarityName = Field("cka", description="linear CKA, unbiased CKA, differentiable mutual nearest "
                                 "neighbours, or feature regression (mse)")
    tokens: Literal["flatten", "per-token"] = Field(
        "flatten", description="sequence activations (B, T, D): one row per sample of T·D features (the paper), or one row per token")
    k: int = Field(10, ge=1, description="dmnn: neighbours per anchor (also used for the mutual-kNN score in reports)")
    tau: float = Field(0.1, gt=0, description="dmnn: softmax temperature on cosine similarities")


class Recipe(StrictModel):
    task: Literal["classification", "causal-lm", "sentence-embedding"] = Field(
        "classification", description="what the model does: image classification (accuracy), next-token prediction "
        "(perplexity), or sentence embeddings (cosine similarity to the guide's)")
    guide: GuideConfig
    target: Optional[TargetConfig] = Field(None, description="architecture transfer: a separate target network (instead of replace)")
    data: DataConfig = Field(default_factory=DataConfig)
    replace: list[RuleConfig] = Field(default_factory=list)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    similarity: SimilarityConfig = Field(default_factory=SimilarityConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    bn_recalibration: BNRecalConfig = Field(default_factory=BNRecalConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    start: Literal["guide", "fresh"] = Field(
        "guide", description="replace recipes: the target starts as the guide, its weights kept outside the replaced "
        "modules (Network of Theseus), or as the guide's architecture from fresh seeded weights (with align.epochs: 0 "
        "and finetune.distill: the same target distilled from the guide, as baseline.runs: distill trains it)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="every random stream of the run derives from it")

    @model_validator(mode="after")
    def _replace_or_transfer(self) -> "Recipe":
        if self.target is None and not self.replace:
            raise ValueError("replace: give replacement rules, or a target section for architecture transfer")
        if self.target is not None and self.finetune.peft is not None:
            raise ValueError("finetune.peft: LoRA adapts a replace recipe's kept (frozen) modules; an architecture "
                             "transfer trains every block of its target")
        if self.finetune.peft is not None and self.start == "fresh":
            raise ValueError("finetune.peft: LoRA adapts the guide's kept weights; start: fresh has none to keep")
        if self.target is not None and self.start == "fresh":
            raise ValueError("start: fresh applies to replace recipes (an architecture transfer's target starts "
                             "fresh anyway)")
        if self.target is not None and self.replace:
            raise ValueError("target: a recipe either replaces modules in place (replace) or rebuilds a target network "
                             "(target), not both")
        if self.align.micro_batch_size and self.schedule.kind in ("independent", "blockwise"):
            raise ValueError(f"align.micro_batch_size: not available for the {self.schedule.kind} schedule (each "
                             "block is fed the guide's input; lower align.batch_size instead)")
        if self.align.cache_guide and self.schedule.kind == "blockwise":
            raise ValueError("align.cache_guide: the blockwise schedule stores the guide's outputs on disk already")
        if self.target is not None and (self.schedule.kind in ("independent", "blockwise")
                                        or self.schedule.order == "reverse"):
            raise ValueError("schedule: architecture transfer builds the target front to back; use progressive, "
                             "sequential or joint in forward order")
        return self

    @model_validator(mode="after")
    def _task_fits_data(self) -> "Recipe":
        text = self.data.source in text_sources()
        if self.task == "classification" and text:
            raise ValueError(f"data.source: {self.data.source!r} is text; task classification takes images ({', '.join(n for n, s in DATA_SOURCES.items() if s.kind == 'images')})")
        if self.task != "classification" and not text:
            raise ValueError(f"data.source: task {self.task} needs text ({', '.join(text_sources())}), not {self.data.source!r}")
        if self.guide.head == "reset" and self.task != "classification":
            raise ValueError(f"guide.head: reset rebuilds a classification head; task {self.task} keeps the guide's")
        if self.data.tokenizer == "guide" and text and not self.guide.arch.startswith("hf:"):
            raise ValueError("data.tokenizer: 'guide' needs an hf: guide whose directory holds a tokenizer")
        return self

    @model_validator(mode="after")
    def _batch_fits_similarity(self) -> "Recipe":

        sim = self.similarity
        batch = self.align.batch_size or self.data.batch_size  # what alignment's similarity sees
        field = "align.batch_size" if self.align.batch_size else "data.batch_size"
        if batch < min_batch(sim.kind, sim.k):
            if sim.kind == "dmnn":
                raise ValueError(f"similarity.k: dmnn with k={sim.k} needs {field} > k, got {batch}")
            raise ValueError(f"similarity.kind: {sim.kind} needs {field} ≥ {min_batch(sim.kind)}, got {batch}")
        if sim.kind == "mse" and self.target is not None:
            raise ValueError("similarity.kind: mse compares activations element by element, but an architecture "
                             "transfer aligns blocks whose widths may differ; use cka, ucka or dmnn")
        return self

    @model_validator(mode="after")
    def _fsdp_applies(self) -> "Recipe":
        """What the sharded path (theseus_cli.training.fsdp) does not do yet, refused before any work."""
        if not self.runtime.fsdp:
            return self
        why = None
        if self.target is not None:
            why = "architecture transfers are not sharded; use a replace recipe"
        elif self.schedule.kind in ("blockwise", "independent") or self.schedule.order == "reverse":
            why = "it introduces every replacement before the first stage: use a progressive, sequential or joint schedule in forward order"
        elif self.schedule.objective != "similarity":
            why = "progressive distillation is not sharded"
        elif self.finetune.peft is not None or self.finetune.checkpointing or self.finetune.distill is not None:
            why = "finetune.peft, finetune.checkpointing and finetune.distill are not combined with sharding yet"
        elif self.align.micro_batch_size or self.align.cache_guide:
            why = "align.micro_batch_size and align.cache_guide are not combined with sharding"
        elif self.baseline.enabled:
            why = "the baselines are not sharded; run them without runtime.fsdp"
        if why:
            raise ValueError(f"runtime.fsdp: {why}")
        return self

    @model_validator(mode="after")
    def _progressive_distillation_applies(self) -> "Recipe":
        """Progressive distillation needs the hybrid's output at every stage (the paper's Appendix I)."""
        if self.schedule.objective != "distill":
            return self
        why = None
        if self.task == "sentence-embedding":
            why = "task sentence-embedding has no output distribution to distil (its output is an embedding)"
        elif self.target is not None:
            why = ("an architecture transfer's partial target has no output until its last block; progressive "
                   "distillation needs in-place replace rules, whose hybrid runs end to end at every stage")
        elif self.schedule.kind in ("independent", "blockwise"):
            why = f"the {self.schedule.kind} schedule feeds each replacement the guide's input; there is no hybrid output"
        elif self.align.cache_guide:
            why = "align.cache_guide caches activations at the replaced modules, which distillation does not compare"
        elif self.align.micro_batch_size:
            why = "align.micro_batch_size is for the similarity objective (whole-batch losses); lower data.batch_size"
        if why:
            raise ValueError(f"schedule.objective: distill does not apply: {why}")
        return self

    def resolved(self) -> dict[str, Any]:
        """Every field with defaults filled in, as plain JSON data."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        return recipe_hash(self.resolved())


def recipe_hash(resolved: dict[str, Any]) -> str:
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def with_key_map(recipe: Recipe, rules: list[str]) -> Recipe:
    """``recipe`` with ``--key-map`` rules (``re:<regex>=><replacement>``) appended to ``guide.key_map``."""
    if not rules:
        return recipe
    added = []
    for i, text in enumerate(rules):
        pattern, sep, to = text.partition("=>")
        try:
            if not sep:
                raise ValueError("write it as 're:<regex>=><replacement>'")
            added.append(KeyRename(match=pattern, to=to))
        except ValueError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(exc, ValidationError) else str(exc)
            raise RecipeError(f"--key-map {text!r} (rule {i + 1}): {reason}") from None
    data = recipe.model_dump(by_alias=True)
    data["guide"]["key_map"] = [r.model_dump() for r in recipe.guide.key_map + added]
    return Recipe.model_validate(data)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    # checked here as well as in Recipe, so it is reported together with field errors (after-validators
    # only run once every field is valid)
    extra = [] if "replace" in data or "target" in data else [
        "replace: Field required (or a target section for architecture transfer)"]
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(source, exc, Recipe, extra)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise :class:`RecipeError` naming every problem."""
    path = Path(path)
    recipe = parse_recipe(read_yaml(path), str(path))
    for message in recipe_warnings(recipe):
        warnings.warn(TheseusWarning(f"{path}: {message}"), stacklevel=2)
    return _resolve_paths(recipe, path.parent)


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What a valid recipe most likely did not mean. A warm-up longer than the fine-tuning is one: the learning rate
    rises through every step and never reaches ``finetune.lr``. It is a warning, not an error, because a shortened
    run (a smoke test, a benchmark's ``--small``) is a fine reason to cut ``epochs`` under the recipe's warm-up."""
    ft, found = recipe.finetune, []
    if ft.epochs > 0 and ft.warmup_epochs > ft.epochs:
        found.append(f"finetune.warmup_epochs {ft.warmup_epochs:g} is more than finetune.epochs {ft.epochs}: the "
                     f"learning rate rises for the whole fine-tuning and ends at {ft.epochs / ft.warmup_epochs:.0%} of "
                     "finetune.lr, with no decay; set warmup_epochs ≤ epochs")
    return found


def _resolve_hf_dir(arch: str, base: Path) -> str:
    """``hf:./dir`` relative to the recipe's folder; other specs unchanged."""
    if arch.startswith("hf:") and arch[3:].startswith((".", "/")) and not Path(arch[3:]).is_absolute():
        return "hf:" + str(base / arch[3:])
    return arch


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative file paths in a recipe are relative to the recipe's own folder, made absolute: a recipe read as
    ``r.yaml`` has the folder ``.``, and ``Path('.') / './dir'`` is ``dir``, which would no longer read as a
    directory (``hf:dir`` is a model type; a tokenizer folder named ``gpt2`` would be the built-in one)."""
    base = base.absolute()
    recipe.guide.arch = _resolve_hf_dir(recipe.guide.arch, base)
    if recipe.target is not None:
        recipe.target.arch = _resolve_hf_dir(recipe.target.arch, base)
    if recipe.guide.checkpoint and not recipe.guide.checkpoint.startswith("pkg:") and not Path(recipe.guide.checkpoint).is_absolute():
        recipe.guide.checkpoint = str(base / recipe.guide.checkpoint)
    if recipe.data.path and not Path(recipe.data.path).is_absolute():
        recipe.data.path = str(base / recipe.data.path)
    tok = recipe.data.tokenizer
    if tok not in ("gpt2", "guide") and not Path(tok).is_absolute():
        recipe.data.tokenizer = str(base / tok)
    return recipe
