"""The registry of model sources: the ``prefix:`` of an architecture spec (``torchvision:resnet18``,
``timm:vit_tiny_patch16_224``, ``hf:gpt2``). Adding one is one function and one decorator.

A builder takes ``(name, kwargs, task)`` and returns an ``nn.Module`` with random weights (never a download).
``vouched`` says whether a saved target may name this source without ``--trust-target``: true for sources
that only build what the installation itself provides. Any other spec is ``package.module:function``, the
one form that imports code a recipe names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from theseus_cli.registry import Registry


@dataclass(frozen=True)
class ModelSource:
    prefix: str
    build: Callable[[str, dict[str, Any], str], Any]
    vouched: bool
    description: str


MODEL_SOURCES: Registry[ModelSource] = Registry("model source")


def register_model_source(prefix: str, *, vouched: bool, description: str):
    def decorator(build: Callable[[str, dict[str, Any], str], Any]) -> Callable:
        MODEL_SOURCES.add(prefix, ModelSource(prefix, build, vouched, description))
        return build

    return decorator
