"""Registry of replacements.

A replacement is registered with :func:`register` into :data:`REPLACEMENTS`
with its own pydantic params model and a plain builder function
``build(old_module, params, shapes) -> nn.Module``. The builder receives the
input/output shapes observed for the old module during a dry forward, because
shape-compatible replacements such as a low-rank Linear for a Conv2d need the
flattened sizes, which the conv's own attributes do not determine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from pydantic import BaseModel


@dataclass(frozen=True)
class IOShapes:
    """Per-sample shapes (batch dimension removed) seen at a module."""

    input: tuple[int, ...]
    output: tuple[int, ...]


Builder = Callable[[nn.Module, BaseModel, IOShapes], nn.Module]


@dataclass(frozen=True)
class Replacement:
    name: str
    params_model: type[BaseModel]
    build: Builder
    accepts: tuple[type, ...]
    summary: str

    def check_accepts(self, module: nn.Module) -> str | None:
        """Return a reason why ``module`` cannot be replaced, or None."""
        if not isinstance(module, self.accepts):
            names = ", ".join(t.__name__ for t in self.accepts)
            return f"{self.name} replaces {names}, not {type(module).__name__}"
        return None


REPLACEMENTS: dict[str, Replacement] = {}


def register(name: str, *, params: type[BaseModel], accepts: tuple[type, ...], summary: str):
    """Decorator: register ``build`` under ``name``."""

    def decorate(build: Builder) -> Builder:
        if name in REPLACEMENTS:
            raise ValueError(f"replacement {name!r} registered twice")
        REPLACEMENTS[name] = Replacement(name, params, build, accepts, summary)
        return build

    return decorate


def get_replacement(name: str) -> Replacement:
    try:
        return REPLACEMENTS[name]
    except KeyError:
        valid = ", ".join(sorted(REPLACEMENTS))
        raise ValueError(f"unknown replacement {name!r} (valid: {valid})") from None
