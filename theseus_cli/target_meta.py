"""The typed metadata a saved target carries (timm's ``PretrainedCfg`` is the model): one schema, written by
``convert`` and ``transport``, read by :func:`~theseus_cli.artifacts.load_target`, ``eval`` and ``export``.

It is stored as JSON under the ``theseus`` key of the safetensors header. ``meta_version`` says which schema
wrote it: files from before the field existed are version 1 (the same fields); a version newer than this
installation knows is refused with one line, rather than read wrongly.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from theseus_cli.errors import ModelError

META_VERSION = 2
TASKS = ("classification", "causal-lm", "sentence-embedding")


class HeadSpec(BaseModel):
    """A head rebuilt after construction (``guide.head: reset``): the ``nn.Linear`` at ``path`` gets ``classes``
    outputs, whatever the constructor's kwargs made it."""

    path: str
    classes: int


class ArchSpec(BaseModel):
    """An architecture: a spec (``torchvision:resnet18``, ``hf:gpt2``, ``module:function``) and its kwargs."""

    model_config = ConfigDict(extra="ignore")
    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    head: Optional[HeadSpec] = None


class Normalization(BaseModel):
    """Per-channel mean/std the model's image inputs were normalised with."""

    mean: list[float]
    std: list[float]


class TransportRecord(BaseModel):
    """For B′ of ``theseus transport``: the transport recipe and the α chosen."""

    recipe: dict[str, Any]
    alpha: float


class TargetMeta(BaseModel):
    model_config = ConfigDict(extra="ignore")
    meta_version: int = 1
    task: Literal["classification", "causal-lm", "sentence-embedding"] = "classification"
    guide: ArchSpec
    target: Optional[ArchSpec] = None  # architecture transfer: the target is its own architecture
    entries: list[dict[str, Any]] = Field(default_factory=list)  # replacement plan entries (PlanEntry.from_dict)
    input_shape: list[int]
    num_classes: Optional[int] = None
    normalization: Optional[Normalization] = None
    tokenizer: Optional[str] = None
    recipe: Optional[dict[str, Any]] = None  # the resolved conversion recipe (None for a transported model)
    recipe_hash: Optional[str] = None
    theseus_version: Optional[str] = None
    transport: Optional[TransportRecord] = None

    @property
    def architecture(self) -> ArchSpec:
        """What rebuilding the file builds before the plan entries are applied."""
        return self.target or self.guide

    def normalization_dict(self) -> Optional[dict[str, list[float]]]:
        """``{"mean": [...], "std": [...]}`` as data loading and export reports take it, or None (text)."""
        return self.normalization.model_dump() if self.normalization is not None else None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: object) -> "TargetMeta":
        """Parse and check the stored JSON; every problem is a one-line :class:`ModelError` naming ``source``."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{source}: the target's metadata is not JSON: {exc}") from None
        return cls.checked(raw, source)

    @classmethod
    def checked(cls, raw: Any, source: object) -> "TargetMeta":
        if not isinstance(raw, dict):
            raise ModelError(f"{source}: the target's metadata is a {type(raw).__name__}, not a mapping")
        version = raw.get("meta_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= META_VERSION:
            raise ModelError(f"{source}: target metadata version {version!r} is not one this theseus reads "
                             f"(1 to {META_VERSION}); a newer theseus wrote it — upgrade theseus-cli")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
            raise ModelError(f"{source}: the target's metadata lacks what rebuilding it needs: {problems}") from None
