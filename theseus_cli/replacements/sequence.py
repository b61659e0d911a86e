"""Replacements for attention: ``token_mlp`` (no token mixing) and ``elman_rnn`` (causal recurrence).

Both stand in for an attention module of timm or transformers with the same
call interface (the ``sequence`` interface of the registry): they accept the
hidden states (B, T, D) positionally or as ``hidden_states=``, accept and
ignore every other argument an attention module is handed (position
embeddings, caches, head masks, flags), and return what the old module
returned — a tensor, or a tuple whose first item is the new hidden states and
whose other items (attention weights, cache entries) are None.

* ``token_mlp`` — Linear(D, H) → activation → Linear(H, D_out) on every token
  independently: the paper's Patch-MLP (attention with no token mixing).
  Default H = 2·D, which has the same weight count as the attention's
  q, k, v and output projections (4·D²).
* ``elman_rnn`` — ``layers`` stacked Elman RNN layers (``torch.nn.RNN``:
  h_t = σ(W x_t + U h_{t−1} + b), σ = tanh or ReLU), then Linear(H, D_out).
  Causal by construction: token t's output depends on tokens ≤ t only. The
  paper's GPT-2 → RNN conversion uses two layers per block.

Masks: a token MLP mixes no tokens, so padding cannot leak and masks are
ignored. The RNN reads the padding from the ``attention_mask`` (or timm's
``attn_mask``) it is handed — a (B, T) keep-mask, or a 4-D boolean/additive
attention mask whose last query row shows which keys exist — and runs each
sequence over its real tokens only (left, right or inner padding alike), with
zero output at padded positions, so a padded batch gives the same outputs as
the sequences run alone. Caches: none are kept (``use_cache`` is switched off
for ``hf:`` guides); generation re-runs the recurrence over the prefix.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from theseus_cli.replacements.registry import IOShapes, register

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def like_old(out: torch.Tensor, arity: int | None):
    """Return ``out`` in the structure the replaced module returned."""
    return out if arity is None else (out,) + (None,) * (arity - 1)


def keep_mask(kwargs: dict, batch: int, tokens: int) -> torch.Tensor | None:
    """(B, T) bool, True at real tokens, from the attention mask the caller passed; None if none is known.

    transformers and timm pass masks by keyword (``attention_mask=``, ``attn_mask=``): a (B, T)
    keep-mask, or a 4-D boolean (True = attend) or additive (0 = attend, very negative = masked)
    mask whose last query row shows every real key, causal or not.
    """
    mask = kwargs.get("attention_mask", kwargs.get("attn_mask"))
    if not isinstance(mask, torch.Tensor) or mask.shape[0] != batch or mask.shape[-1] != tokens:
        return None
    if mask.dim() == 4:
        row = mask[:, 0, -1, :]
        if row.dtype == torch.bool:
            return row
        return row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    if mask.dim() == 2:
        return mask > 0.5 if mask.is_floating_point() else mask.bool()
    return None


class TokenParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: Optional[int] = Field(None, ge=1, description="hidden width; default hidden_ratio × input width")
    hidden_ratio: float = Field(2.0, gt=0, description="hidden width as a multiple of the input width (2 = attention's weight count)")
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    bias: bool = True

    def width(self, d_in: int) -> int:
        return self.hidden or max(1, int(round(self.hidden_ratio * d_in)))


class TokenMLP(nn.Module):
    """Per-token MLP with an attention module's call interface."""

    def __init__(self, d_in: int, d_out: int, hidden: int, activation: str = "gelu", bias: bool = True,
                 output_arity: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)
        self.output_arity = output_arity

    def forward(self, hidden_states, *args, **kwargs):
        return like_old(self.fc2(self.act(self.fc1(hidden_states))), self.output_arity)


@register("token_mlp", params=TokenParams, accepts=(nn.Module,), interface="sequence",
          summary="attention → per-token MLP (no token mixing)")
def build_token_mlp(old: nn.Module, params: TokenParams, shapes: IOShapes) -> nn.Module:
    d_in, d_out = shapes.input[-1], shapes.output[-1]
    return TokenMLP(d_in, d_out, params.width(d_in), params.activation, params.bias, shapes.output_arity)


class RNNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: int = Field(2, ge=1, description="stacked Elman RNN layers (the paper: 2 per GPT-2 block)")
    hidden: Optional[int] = Field(None, ge=1, description="recurrent width; default the input width")
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    bias: bool = True


class ElmanRNN(nn.Module):
    """Stacked Elman RNN + output projection, causal, with an attention module's call interface."""

    def __init__(self, d_in: int, d_out: int, hidden: int, layers: int = 2, nonlinearity: str = "tanh",
                 bias: bool = True, output_arity: int | None = None):
        super().__init__()
        self.rnn = nn.RNN(d_in, hidden, num_layers=layers, nonlinearity=nonlinearity, bias=bias, batch_first=True)
        self.out = nn.Linear(hidden, d_out, bias=bias)
        self.output_arity = output_arity

    def forward(self, hidden_states, *args, **kwargs):
        x = hidden_states
        keep = keep_mask(kwargs, x.shape[0], x.shape[1])
        if keep is None:
            y, _ = self.rnn(x)
            return like_old(self.out(y), self.output_arity)
        # Padded batch: move each sequence's real tokens to the front (order kept), run, put them back. The RNN is
        # causal, so the real tokens' outputs do not see the padding now behind them. Written with cumsum, scatter
        # and gather only (no packed sequences, no data-dependent branch), so it also exports to ONNX and traces.
        k = keep.to(torch.int64)
        dest = torch.where(keep, k.cumsum(1) - 1, k.sum(1, keepdim=True) + (1 - k).cumsum(1) - 1)
        dest = dest.unsqueeze(-1)
        compact = torch.zeros_like(x).scatter(1, dest.expand_as(x), x)
        y, _ = self.rnn(compact)
        restored = torch.gather(y, 1, dest.expand(-1, -1, y.shape[-1]))
        out = self.out(restored) * keep.unsqueeze(-1).to(restored.dtype)
        return like_old(out, self.output_arity)


@register("elman_rnn", params=RNNParams, accepts=(nn.Module,), interface="sequence",
          summary="attention → stacked Elman RNN (causal) + Linear")
def build_elman_rnn(old: nn.Module, params: RNNParams, shapes: IOShapes) -> nn.Module:
    d_in, d_out = shapes.input[-1], shapes.output[-1]
    return ElmanRNN(d_in, d_out, params.hidden or d_in, params.layers, params.nonlinearity, params.bias,
                    shapes.output_arity)
