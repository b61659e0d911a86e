"""Convolutions made cheaper, keeping the convolution: ``separable_conv`` and ``lowrank_conv``.

Both replace a dense convolution (``nn.Conv1d``/``Conv2d``/``Conv3d`` with ``groups = 1``; any stride, padding,
padding mode and dilation; timm's run-time 'SAME'-padded ``Conv2dSame`` too) with two convolutions whose composition has the old one's geometry, so the output has
the old shape at every input size (unlike ``lowrank_linear``, they keep locality and weight sharing):

* ``separable_conv`` — MobileNet's depthwise-separable form: a depthwise k×k convolution with the old geometry
  (one filter per input channel, depth multiplier 1), then a pointwise 1×1 to the output channels. Weights
  ``C_in·k² + C_in·C_out`` instead of ``C_in·C_out·k²``. ``norm: true`` puts a BatchNorm, ``activation`` a
  nonlinearity, between the two (both off by default: the plain composition is still a linear map, the closest
  stand-in for the single conv it replaces; MobileNet's blocks use both). A 1×1 convolution has nothing to separate
  and is refused.
* ``lowrank_conv`` — a k×k convolution to ``rank`` channels, then a 1×1 to the output channels: the rank-r
  factorisation of the unfolded weight (C_out × C_in·k²), weights ``r·(C_in·k² + C_out)``. ``init: svd`` starts
  from the truncated SVD of the guide's unfolded weight (exact at full rank).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from theseus_cli.replacements.rank import RankParams, load_factors
from theseus_cli.replacements.registry import IOShapes, register

DENSE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU}
_NORMS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _dense_only(old: nn.Module) -> str | None:
    if old.groups != 1:
        return f"grouped convolution (groups={old.groups}): this replacement factorises a dense one (groups=1)"
    return None


def _conv_kind(old: nn.Module) -> type:
    """The torch class of the convolution's dimensionality (a subclass, such as timm's Conv2dSame, maps to it)."""
    return next(kind for kind in DENSE_CONVS if isinstance(old, kind))


def pads_same_at_run_time(old: nn.Module) -> bool:
    """timm's ``Conv2dSame`` (every ``tf_*`` EfficientNet's stem among others) pads in its forward as TensorFlow's
    'SAME' does, whatever its ``padding`` attribute says (0)."""
    return any(k.__name__ in ("Conv2dSame", "Conv2dSameExport") for k in type(old).__mro__)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one axis: the output has ceil(size / stride) positions; odd totals put the
    extra row or column after (right/bottom)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A ``Conv2d`` that pads its input at run time as TensorFlow's 'SAME' does: the stand-in for the first half of
    a factorised ``Conv2dSame``, so the pair keeps its output shape at every input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = (_same_padding(x.shape[-2 + i], self.kernel_size[i], self.stride[i],
                                                      self.dilation[i]) for i in range(2))
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


def _same_geometry(old: nn.Module, in_ch: int, out_ch: int, groups: int) -> nn.Module:
    """A convolution with ``old``'s kernel, stride, padding, padding mode and dilation, and no bias."""
    if pads_same_at_run_time(old):
        return SamePadConv2d(in_ch, out_ch, old.kernel_size, stride=old.stride, dilation=old.dilation, groups=groups,
                             bias=False)
    return _conv_kind(old)(in_ch, out_ch, old.kernel_size, stride=old.stride, padding=old.padding,
                           dilation=old.dilation, groups=groups, bias=False, padding_mode=old.padding_mode)


def _pointwise(old: nn.Module, in_ch: int, bias: bool) -> nn.Module:
    return _conv_kind(old)(in_ch, old.out_channels, 1, bias=bias)


class SeparableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    norm: bool = Field(False, description="BatchNorm between the depthwise and the pointwise convolution")
    activation: Literal["none", "relu", "relu6", "gelu", "silu"] = Field(
        "none", description="nonlinearity between the two (after the norm, if any)")
    bias: Optional[bool] = Field(None, description="bias on the pointwise convolution; default: as the guide's conv")


class SeparableConv(nn.Sequential):
    """depthwise (old geometry) → [norm] → [activation] → pointwise 1×1."""


def _separable_fits(old: nn.Module, params: SeparableParams, shapes: IOShapes) -> str | None:
    if all(k == 1 for k in old.kernel_size):
        return "a 1×1 convolution has nothing to separate (leave it out of the rule's match, or use lowrank_conv)"
    return _dense_only(old)


@register("separable_conv", params=SeparableParams, accepts=DENSE_CONVS, fits=_separable_fits,
          summary="Conv (groups=1) → depthwise k×k + pointwise 1×1 (MobileNet)")
def build_separable_conv(old: nn.Module, params: SeparableParams, shapes: IOShapes) -> nn.Module:
    c_in = old.in_channels
    parts: list[nn.Module] = [_same_geometry(old, c_in, c_in, groups=c_in)]
    if params.norm:
        parts.append(_NORMS[_conv_kind(old)](c_in))
    if params.activation != "none":
        parts.append(_ACTIVATIONS[params.activation]())
    # A depthwise bias before a purely linear path is absorbed by the pointwise bias; before a nonlinearity it is not.
    if params.activation != "none" and not params.norm:
        parts[0].bias = nn.Parameter(parts[0].weight.new_zeros(c_in))
    bias = old.bias is not None if params.bias is None else params.bias
    return SeparableConv(*parts, _pointwise(old, c_in, bias))


class LowRankConvParams(RankParams):
    bias: Optional[bool] = Field(None, description="bias on the 1×1 convolution; default: as the guide's conv")


class LowRankConv(nn.Sequential):
    """k×k conv (old geometry) to ``rank`` channels → 1×1 conv to the output channels."""


def _full_rank(old: nn.Module) -> int:
    return min(old.out_channels, old.weight[0].numel())


def _lowrank_conv_fits(old: nn.Module, params: LowRankConvParams, shapes: IOShapes) -> str | None:
    if params.init == "activation_svd":
        return "init activation_svd weights a Linear/Conv1D layer's inputs; a convolution starts from init svd"
    return _dense_only(old) or params.too_high(
        _full_rank(old), f"its unfolded weight ({old.out_channels} × {old.weight[0].numel()})")


@register("lowrank_conv", params=LowRankConvParams, accepts=DENSE_CONVS, fits=_lowrank_conv_fits,
          summary="Conv (groups=1) → k×k conv to rank channels + 1×1 conv")
def build_lowrank_conv(old: nn.Module, params: LowRankConvParams, shapes: IOShapes) -> nn.Module:
    rank = params.resolve(_full_rank(old), default=max(1, _full_rank(old) // 4))
    bias = old.bias is not None if params.bias is None else params.bias
    new = LowRankConv(_same_geometry(old, old.in_channels, rank, groups=1), _pointwise(old, rank, bias))
    if params.init == "svd":
        load_factors(new[0].weight, new[1].weight, old.weight.flatten(1), rank)
        if bias and old.bias is not None and not new[1].bias.is_meta:
            new[1].bias.data.copy_(old.bias.detach())
    return new
