"""LoRA fine-tuning with the PEFT library: adapters on a hybrid's kept modules, the replacements trained in full.

``finetune.peft: {kind: lora, rank, alpha, dropout, targets}``. Why: a large guide's kept weights are most of the
target, and fine-tuning all of them costs their gradients and AdamW's two moments (16 bytes a parameter in
float32); with LoRA the kept weights stay frozen and only the adapters (``rank · (fan_in + fan_out)`` a layer) and
the replacements train. The replacements are new modules that alignment only started, so they train in full, as
LoLCATs repairs its converted layers.

The adapters are PEFT's (:class:`peft.tuners.lora.LoraModel`, injected in place into the hybrid), never
hand-written. Which modules get one: those ``targets`` names (the recipe's pattern grammar) that are kept — not a
replacement nor inside one — of a type PEFT adapts (Linear, Conv1D, Conv2d, Embedding), and whose weight is not
tied to another module's (GPT-2's head shares the token embedding: merging a delta into it would change the
embedding too). After training, :meth:`LoraAdapters.merge` folds ``(alpha / rank) · B·A`` into each frozen weight
and takes the adapters out, so ``target.safetensors``, ``load_target``, export and streaming see a plain model.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from theseus_cli.config.phases import PeftConfig
from theseus_cli.errors import RecipeError
from theseus_cli.surgery.matching import pattern_matches

ADAPTABLE = ("Linear", "Conv1D", "Conv2d", "Embedding")  # module types PEFT's LoRA adapts (class names)


def _inside(path: str, replaced: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in replaced)


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of weight tensors held by more than one module (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def lora_targets(model: nn.Module, cfg: PeftConfig, replaced: list[str]) -> list[str]:
    """The dotted paths of the kept modules that get adapters (see the module docstring)."""
    tied = _tied_weights(model)
    out = []
    for path, module in model.named_modules():
        if not path or _inside(path, replaced) or type(module).__name__ not in ADAPTABLE:
            continue
        if id(getattr(module, "weight", None)) in tied:
            continue
        if any(pattern_matches(p, path, module) for p in cfg.targets):
            out.append(path)
    return out


def checked_targets(model: nn.Module, cfg: PeftConfig, replaced: list[str]) -> list[str]:
    """:func:`lora_targets`, or a :class:`RecipeError` naming the field when there are none."""
    targets = lora_targets(model, cfg, replaced)
    if not targets:
        raise RecipeError(f"finetune.peft.targets: {cfg.targets} match no kept module PEFT can adapt "
                          f"({', '.join(ADAPTABLE)}, outside the replacements, weight not tied to another's)")
    return targets


def adapter_params(model: nn.Module, paths: list[str], rank: int) -> int:
    """Parameters the adapters on ``paths`` add: ``rank · (fan_in + fan_out)`` each (the plan-time memory check)."""
    modules = dict(model.named_modules())
    total = 0
    for path in paths:
        w = modules[path].weight
        fan_out, fan_in = (w.shape[1], w.shape[0]) if type(modules[path]).__name__ == "Conv1D" else (w.shape[0], w[0].numel())
        total += rank * (fan_in + fan_out)
    return total


@dataclass
class LoraAdapters:
    """The adapters injected into a model (PEFT's :class:`LoraModel`), and what is trained."""

    wrapper: Any
    targets: list[str]
    trainable: int
    frozen: int

    def merge(self) -> nn.Module:
        """Fold the adapters into the frozen weights and take them out: the plain model. Each adapted layer's weight
        is copied first, so a hybrid that shares the guide's tensors (``hybrid_start``) never writes into the
        guide; the other kept weights stay shared and frozen."""
        from peft.tuners.lora import LoraLayer

        for module in self.wrapper.model.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        return self.wrapper.merge_and_unload()

    def summary(self) -> dict[str, Any]:
        return {"kind": "lora", "modules": len(self.targets), "trainable_params": self.trainable,
                "frozen_params": self.frozen}


def attach_lora(model: nn.Module, cfg: PeftConfig, replaced: list[str]) -> LoraAdapters:
    """Inject LoRA adapters into ``model`` in place; only they and the replacements' parameters stay trainable."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    targets = checked_targets(model, cfg, replaced)
    # a string is matched in full against each module's path; a list would also match every path that merely ends
    # with one of the names (a replacement's submodule "3.0" for the kept "0")
    exactly = "|".join(re.escape(t) for t in targets)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=f"(?:{exactly})",
                        bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set per Conv1D layer: PEFT says so in a warning each time
        wrapper = LoraModel(model, config, "default")
    try:
        from peft.functional import cast_adapter_dtype
    except ImportError:  # peft < 0.15
        from peft.tuners.tuners_utils import cast_adapter_dtype
    # adapters on bfloat16 frozen weights are created bfloat16; they train in float32 (autocast runs them in bf16)
    cast_adapter_dtype(model, "default", autocast_adapter_dtype=True)
    modules = dict(model.named_modules())
    for path in replaced:
        for p in modules[path].parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return LoraAdapters(wrapper, targets, trainable, frozen)
