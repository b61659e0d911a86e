"""Sequence replacements on activations that are not (batch, tokens, features): windowed and conv-shaped attention.

torchvision's Swin ``ShiftedWindowAttention`` maps (B, H, W, C) to (B, H, W, C); timm's EfficientViT attention
(``LiteMLA``) maps (B, C, H, W) to (B, C, H, W). A per-position replacement (``token_mlp``) is well defined on any
such layout — the same MLP over the channel axis at every position — and so is a non-causal ``linear_attention``,
whose tokens are the positions in row-major order (non-causal attention does not depend on that order).

``params.channels`` says where the channels are: ``last`` (B, …, C), ``first`` (B, C, …), or ``auto``: a plain
sequence (B, T, D) has them last; otherwise the replaced module's first ``nn.Linear`` or convolution decides — a
Linear reading the last axis means channel-last, a convolution reading the first means channel-first. Where neither
tells (no such layer, or it reads neither end), the plan refuses with the reason and asks for ``channels``. 3-D, 4-D
and 5-D activations (1 to 3 position axes) are accepted; every axis but the channels must keep its size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from theseus_cli.replacements.registry import IOShapes

Channels = Literal["auto", "last", "first"]
CHANNELS_HELP = ("where an activation's channels are: last (B, …, C), first (B, C, …), or auto (sequences: last; "
                 "otherwise what the replaced module's first Linear or convolution reads)")


def _evidence(old: nn.Module, per_sample: tuple[int, ...]) -> str | None:
    for module in old.modules():
        if isinstance(module, nn.Linear):
            return "last" if module.in_features == per_sample[-1] else None
        if isinstance(module, nn.modules.conv._ConvNd):
            return "first" if module.in_channels == per_sample[0] else None
    return None


def channel_axis(old: nn.Module, shapes: IOShapes, choice: str) -> tuple[str | None, str | None]:
    """(``last`` | ``first``, None), or (None, why the channel axis cannot be settled)."""
    inp, out = tuple(shapes.input), tuple(shapes.output)
    if len(inp) == 2 and choice != "first":
        return "last", None
    if choice == "auto":
        choice = _evidence(old, inp)
        if choice is None:
            return None, (f"cannot tell which axis of its input {inp} holds the channels (no Linear or convolution "
                          "inside reads either end); set params.channels: last or first")
    positions_in, positions_out = (inp[:-1], out[:-1]) if choice == "last" else (inp[1:], out[1:])
    if positions_in != positions_out:
        return None, f"with channels {choice}, its positions change ({positions_in} → {positions_out})"
    return choice, None


def widths(shapes: IOShapes, axis: str) -> tuple[int, int]:
    """(input channels, output channels) on the settled axis."""
    pick = -1 if axis == "last" else 0
    return shapes.input[pick], shapes.output[pick]


class PerPosition(nn.Module):
    """Runs a sequence module over every position of a channel-last or channel-first activation: channels moved
    last, positions flattened to tokens (row-major), the module run, the result put back in the input's layout."""

    def __init__(self, inner: nn.Module, channels: str, output_arity: int | None = None):
        super().__init__()
        self.inner, self.channels, self.output_arity = inner, channels, output_arity

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states.movedim(1, -1) if self.channels == "first" else hidden_states
        positions = x.shape[:-1]
        y = self.inner(x.reshape(x.shape[0], -1, x.shape[-1]))
        y = y.reshape(*positions, y.shape[-1])
        y = y.movedim(-1, 1) if self.channels == "first" else y
        return y if self.output_arity is None else (y,) + (None,) * (self.output_arity - 1)


def wrapped(inner: nn.Module, shapes: IOShapes, axis: str) -> nn.Module:
    """``inner`` as it is for a plain sequence, else inside :class:`PerPosition` (which takes over the arity)."""
    if len(shapes.input) == 2 and axis == "last":
        return inner
    inner.output_arity = None
    return PerPosition(inner, axis, shapes.output_arity)
