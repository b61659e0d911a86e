"""``lowrank_linear``: a convolution replaced by a factorised dense layer.

The paper's "equivalent low-rank linear" (section 3.1): flatten the C×H×W
input, project it to ``rank`` features, project those to C'×H'×W' and reshape.
A convolution on a fixed-size input is a linear map of the flattened input,
whatever its stride, padding (any padding mode), dilation or groups, so the
dense factorisation is shape-compatible with every Conv1d/2d/3d (transposed
ones too) by construction: only the input size observed in the dry forward is
fixed, and feeding another size raises a clear error instead of silently
broadcasting. All spatial priors (locality, weight sharing, translation
equivariance) are gone, which is the point of the conversion.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from theseus_cli.replacements.registry import IOShapes, register


class LowRankLinearParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(256, ge=1, description="width of the bottleneck between the two Linear layers")
    bias: bool = Field(True, description="bias on the output projection (a conv bias is per channel; this one is per output element)")


class LowRankLinear(nn.Module):
    """x (B, *in_shape) → flatten → Linear(in, rank) → Linear(rank, out) → (B, *out_shape)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int, bias: bool = True):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        self.down = nn.Linear(math.prod(self.in_shape), rank, bias=False)
        self.up = nn.Linear(rank, math.prod(self.out_shape), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise RuntimeError(
                f"LowRankLinear expects inputs of shape (B, {', '.join(map(str, self.in_shape))}), "
                f"got {tuple(x.shape)}: the target was built for a fixed input size"
            )
        return self.up(self.down(x.flatten(1))).view(x.shape[0], *self.out_shape)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, rank={self.down.out_features}"


@register(
    "lowrank_linear",
    params=LowRankLinearParams,
    accepts=(nn.modules.conv._ConvNd,),
    summary="Conv → flatten, Linear(in, rank), Linear(rank, out), reshape",
)
def build_lowrank_linear(old: nn.Module, params: LowRankLinearParams, shapes: IOShapes) -> nn.Module:
    return LowRankLinear(shapes.input, shapes.output, params.rank, params.bias)
