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
the sequences run alone.

Generation: handed transformers' cache (``generate(..., use_cache=True)``), a
module keeps its state in its guide module's slot of that cache
(:mod:`theseus_cli.replacements.state`) — the RNN its per-layer hidden states
after the last real token of each sequence, the token MLP only the count of
tokens seen — and each later step feeds the new tokens only: constant time and
memory per token. Tokens after the prompt are taken as real (``generate``
never pads them).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from theseus_cli.replacements.layout import CHANNELS_HELP, Channels, channel_axis, widths, wrapped
from theseus_cli.replacements.registry import IOShapes, register
from theseus_cli.replacements.state import guide_layer_idx, state_slot

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
    channels: Channels = Field("auto", description=CHANNELS_HELP)

    def width(self, d_in: int) -> int:
        return self.hidden or max(1, int(round(self.hidden_ratio * d_in)))


class TokenMLP(nn.Module):
    """Per-token MLP with an attention module's call interface."""

    def __init__(self, d_in: int, d_out: int, hidden: int, activation: str = "gelu", bias: bool = True,
                 output_arity: int | None = None, layer_idx: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)
        self.output_arity, self.layer_idx = output_arity, layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        slot = state_slot(kwargs, self.layer_idx, "token_mlp")
        if slot is not None:  # no state; the count of tokens seen gives the model its positions
            slot.store((), hidden_states.shape[1])
        return like_old(self.fc2(self.act(self.fc1(hidden_states))), self.output_arity)


def _token_fits(old: nn.Module, params: TokenParams, shapes: IOShapes) -> str | None:
    return channel_axis(old, shapes, params.channels)[1]


@register("token_mlp", params=TokenParams, accepts=(nn.Module,), interface="sequence", fits=_token_fits, layouts=True,
          summary="attention → per-token (per-position) MLP (no token mixing)")
def build_token_mlp(old: nn.Module, params: TokenParams, shapes: IOShapes) -> nn.Module:
    axis = channel_axis(old, shapes, params.channels)[0]
    d_in, d_out = widths(shapes, axis)
    return wrapped(TokenMLP(d_in, d_out, params.width(d_in), params.activation, params.bias, shapes.output_arity,
                            guide_layer_idx(old)), shapes, axis)


class RNNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: int = Field(2, ge=1, description="stacked Elman RNN layers (the paper: 2 per GPT-2 block)")
    hidden: Optional[int] = Field(None, ge=1, description="recurrent width; default the input width")
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    bias: bool = True


class ElmanRNN(nn.Module):
    """Stacked Elman RNN + output projection, causal, with an attention module's call interface."""

    def __init__(self, d_in: int, d_out: int, hidden: int, layers: int = 2, nonlinearity: str = "tanh",
                 bias: bool = True, output_arity: int | None = None, layer_idx: int | None = None):
        super().__init__()
        self.rnn = nn.RNN(d_in, hidden, num_layers=layers, nonlinearity=nonlinearity, bias=bias, batch_first=True)
        self.out = nn.Linear(hidden, d_out, bias=bias)
        self.output_arity, self.layer_idx = output_arity, layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        x = hidden_states
        slot = state_slot(kwargs, self.layer_idx, "elman_rnn")
        if slot is not None and slot.state is not None:  # a generation step: continue from the kept state
            y, h = self.rnn(x, slot.state[0].transpose(0, 1).contiguous())
            slot.store((h.transpose(0, 1),), x.shape[1])
            return like_old(self.out(y), self.output_arity)
        keep = keep_mask(kwargs, x.shape[0], x.shape[1])
        if keep is None:
            y, h = self.rnn(x)
            if slot is not None:
                slot.store((h.transpose(0, 1),), x.shape[1])
            return like_old(self.out(y), self.output_arity)
        # Padded batch: move each sequence's real tokens to the front (order kept), run, put them back. The RNN is
        # causal, so the real tokens' outputs do not see the padding now behind them. Written with cumsum, scatter
        # and gather only (no packed sequences, no data-dependent branch), so it also exports to ONNX and traces.
        k = keep.to(torch.int64)
        dest = torch.where(keep, k.cumsum(1) - 1, k.sum(1, keepdim=True) + (1 - k).cumsum(1) - 1)
        dest = dest.unsqueeze(-1)
        compact = torch.zeros_like(x).scatter(1, dest.expand_as(x), x)
        y, _ = self.rnn(compact)
        if slot is not None:  # the state after each sequence's last real token, not after the padding behind it
            slot.store((self.states_at(compact, (k.sum(1) - 1).clamp(min=0)),), x.shape[1])
        restored = torch.gather(y, 1, dest.expand(-1, -1, y.shape[-1]))
        out = self.out(restored) * keep.unsqueeze(-1).to(restored.dtype)
        return like_old(out, self.output_arity)

    def states_at(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B, layers, H): every layer's hidden state at position ``last[b]`` of sequence ``b``, from a zero start.

        ``nn.RNN`` returns only the top layer's outputs, so the layers run one at a time here (the same kernel,
        ``torch.rnn_tanh``/``rnn_relu`` with one layer's weights: the outputs are those of the stacked call)."""
        run = torch.rnn_tanh if self.rnn.nonlinearity == "tanh" else torch.rnn_relu
        rows, states, inp = torch.arange(x.shape[0], device=x.device), [], x
        for layer in range(self.rnn.num_layers):
            names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.rnn.bias else ())
            weights = [getattr(self.rnn, f"{n}_l{layer}") for n in names]
            h0 = x.new_zeros(1, x.shape[0], self.rnn.hidden_size)
            inp, _ = run(inp, h0, weights, self.rnn.bias, 1, 0.0, False, False, True)
            states.append(inp[rows, last])
        return torch.stack(states, 1)


@register("elman_rnn", params=RNNParams, accepts=(nn.Module,), interface="sequence",
          summary="attention → stacked Elman RNN (causal) + Linear")
def build_elman_rnn(old: nn.Module, params: RNNParams, shapes: IOShapes) -> nn.Module:
    d_in, d_out = shapes.input[-1], shapes.output[-1]
    return ElmanRNN(d_in, d_out, params.hidden or d_in, params.layers, params.nonlinearity, params.bias,
                    shapes.output_arity, guide_layer_idx(old))
