"""``lowrank_linear``: a dense layer factorised through a ``rank``-wide bottleneck.

For a ``nn.Linear`` (or transformers' ``Conv1D``, GPT-2's projections): ``Linear(in, rank) → Linear(rank, out)`` on
the last axis, any leading shape; ``init: svd`` starts from the truncated SVD of the guide's weight
(:mod:`theseus_cli.replacements.rank`), exact at full rank. Weights ``rank·(in + out)`` instead of ``in·out``.

For a convolution, the paper's "equivalent low-rank linear" (section 3.1): flatten the C×H×W
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
from pydantic import Field

from theseus_cli.replacements.rank import RankParams, load_factors
from theseus_cli.replacements.registry import IOShapes, register

DEFAULT_RANK = 256  # when neither rank nor rank_ratio is given (capped at the full rank)


class _HFConv1DType(type):
    """``isinstance(m, HFConv1D)`` is true for transformers' ``Conv1D`` (a Linear with its weight stored
    in × out) without importing transformers here."""

    def __instancecheck__(cls, obj) -> bool:
        return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers") for k in type(obj).__mro__)


class HFConv1D(metaclass=_HFConv1DType):
    """Stands for ``transformers.pytorch_utils.Conv1D`` in ``accepts`` (see :class:`_HFConv1DType`)."""


HFConv1D.__name__ = "Conv1D"  # as messages name it: "lowrank_linear replaces _ConvNd, Linear, Conv1D, not …"


class LowRankLinearParams(RankParams):
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


class LowRankDense(nn.Module):
    """x (…, in) → Linear(in, rank, no bias) → Linear(rank, out) → (…, out): a factorised ``nn.Linear``."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _dense_weight(old: nn.Module) -> torch.Tensor:
    """The weight as out × in (transformers' Conv1D stores it in × out)."""
    return old.weight.t() if isinstance(old, HFConv1D) else old.weight


def _lowrank_fits(old: nn.Module, params: LowRankLinearParams, shapes: IOShapes) -> str | None:
    if isinstance(old, nn.modules.conv._ConvNd):
        if params.init != "random":
            return (f"init {params.init} factorises a weight matrix; a convolution's flattened map is not one (use "
                    "lowrank_conv for an SVD start that keeps the convolution)")
        return None
    out_f, in_f = _dense_weight(old).shape
    return params.too_high(min(out_f, in_f), f"its weight ({out_f} × {in_f})")


@register(
    "lowrank_linear",
    params=LowRankLinearParams,
    accepts=(nn.modules.conv._ConvNd, nn.Linear, HFConv1D),
    fits=_lowrank_fits,
    summary="Linear/Conv1D → Linear(in, rank) + Linear(rank, out); Conv → flatten, the same, reshape",
)
def build_lowrank_linear(old: nn.Module, params: LowRankLinearParams, shapes: IOShapes) -> nn.Module:
    if isinstance(old, nn.modules.conv._ConvNd):
        d_in, d_out = math.prod(shapes.input), math.prod(shapes.output)
        return LowRankLinear(shapes.input, shapes.output, params.resolve(min(d_in, d_out), DEFAULT_RANK), params.bias)
    weight = _dense_weight(old)
    rank = params.resolve(min(weight.shape), DEFAULT_RANK)
    new = LowRankDense(weight.shape[1], weight.shape[0], rank, params.bias)
    if params.init != "random":  # svd, or activation_svd weighted by the inputs the module receives
        load_factors(new.down.weight, new.up.weight, weight, rank,
                     shapes.input_moment if params.wants_input_moment else None)
        if params.bias and old.bias is not None and not new.up.bias.is_meta:
            new.up.bias.data.copy_(old.bias.detach())
    return new
