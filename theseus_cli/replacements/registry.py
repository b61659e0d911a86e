"""Registry of replacements.

A replacement is registered with :func:`register` into :data:`REPLACEMENTS`
with its own pydantic params model and a plain builder function
``build(old_module, params, shapes) -> nn.Module``. The builder receives the
input/output shapes observed for the old module during a dry forward, because
shape-compatible replacements such as a low-rank Linear for a Conv2d need the
flattened sizes, which the conv's own attributes do not determine.

Each replacement declares the call interface it can stand in for:
``tensor`` — the old module maps one tensor to one tensor (a conv);
``sequence`` — the old module takes hidden states (B, T, D), positionally or
as ``hidden_states=``, possibly with masks, caches and flags, and returns a
tensor or a tuple whose first element is the new hidden states (attention
modules of timm and transformers); the replacement returns the same structure
(``IOShapes.output_arity``), with None in the other slots.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch.nn as nn
from pydantic import BaseModel

from theseus_cli.registry import Registry
from theseus_cli.shapes import ShapeRecord


@dataclass(frozen=True)
class IOShapes:
    """Per-sample shapes (batch dimension removed) seen at a module."""

    input: tuple[int, ...]
    output: tuple[int, ...]
    output_arity: int | None = None  # None: the old module returned a tensor; n: a tuple of n items
    # the second moment (in × in, float64) of the module's input features on calibration inputs, for builders whose
    # params ask for it (``wants_input_moment``); None at plan time and wherever no inputs are given
    input_moment: Any = field(default=None, compare=False)


Builder = Callable[[nn.Module, BaseModel, IOShapes], nn.Module]
Fits = Callable[[nn.Module, BaseModel, IOShapes], "str | None"]


@dataclass(frozen=True)
class Replacement:
    name: str
    params_model: type[BaseModel]
    build: Builder
    accepts: tuple[type, ...]
    summary: str
    interface: str = "tensor"  # tensor | sequence (see the module docstring)
    fits: Fits | None = None  # why this module, with these params, cannot be replaced (grouped conv, rank too high)
    layouts: bool = False  # sequence interface: also channel-last/first activations of 3-D to 5-D (replacements.layout)

    def check_fit(self, module: nn.Module, params: BaseModel, shapes: IOShapes) -> str | None:
        """Return a reason why ``module``, called with ``shapes``, cannot take this replacement with ``params``, or
        None. Called after :meth:`check_accepts` and :meth:`check_call`, at plan time, before anything is built."""
        return self.fits(module, params, shapes) if self.fits is not None else None

    def check_accepts(self, module: nn.Module) -> str | None:
        """Return a reason why ``module`` cannot be replaced, or None."""
        if not isinstance(module, self.accepts):
            names = ", ".join(t.__name__ for t in self.accepts)
            return f"{self.name} replaces {names}, not {type(module).__name__}"
        return None

    def check_call(self, rec: ShapeRecord) -> str | None:
        """Why the call observed in the dry forward (``hooks.trace_shapes`` record) does not fit, or None."""
        if rec.input is None or rec.output is None:
            return "takes or returns no tensor"
        if self.interface == "tensor":
            if rec.n_inputs != 1 or rec.output_arity is not None:
                return "does not map one tensor to one tensor"
            return None
        dims_ok = len(rec.input) == len(rec.output) and (len(rec.input) == 2 or (self.layouts and 2 <= len(rec.input) <= 4))
        if not dims_ok:
            also = " or a channel axis at every position of 4-D/5-D ones" if self.layouts else ""
            return (f"{self.name} needs sequence activations (batch, tokens, features){also} in and out; "
                    f"saw input {rec.input} and output {rec.output} per sample")
        if len(rec.input) == 2 and rec.input[0] != rec.output[0] and not self.layouts:
            return f"changes the number of tokens ({rec.input[0]} → {rec.output[0]})"
        if rec.returns_other:
            return "returns neither a tensor nor a tuple"
        return None


REPLACEMENTS: Registry[Replacement] = Registry("replacement")


def register(name: str, *, params: type[BaseModel], accepts: tuple[type, ...], summary: str, interface: str = "tensor",
             fits: Fits | None = None, layouts: bool = False):
    """Decorator: register ``build`` under ``name``; ``fits`` (optional) refuses a module with a one-line reason;
    ``layouts``: a sequence replacement that also takes channel-last/first activations (its ``fits`` checks them)."""

    def decorate(build: Builder) -> Builder:
        if interface not in ("tensor", "sequence"):
            raise ValueError(f"replacement {name!r}: interface must be tensor or sequence")
        REPLACEMENTS.add(name, Replacement(name, params, build, accepts, summary, interface, fits, layouts))
        return build

    return decorate


def get_replacement(name: str) -> Replacement:
    return REPLACEMENTS.lookup(name, sort=True)


_WEIGHTS_FOLLOW: ContextVar[bool] = ContextVar("theseus_weights_follow", default=False)


@contextmanager
def weights_follow() -> Iterator[None]:
    """Replacements built inside will receive saved weights next (``load_target``): builders skip starts computed
    from the old module's weights (an SVD per layer costs seconds on a large model and would be overwritten)."""
    token = _WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FOLLOW.reset(token)


def start_from_weights() -> bool:
    """Whether a builder should compute its start from the old module's weights (False inside :func:`weights_follow`)."""
    return not _WEIGHTS_FOLLOW.get()
