"""``linear_attention``: attention → kernelised linear attention, cost linear in the sequence length.

Softmax attention weighs value ``j`` for query ``i`` by ``exp(q_i·k_j)``; kernelised attention (Katharopoulos et
al., 2020) by ``φ(q_i)·φ(k_j)`` for a positive feature map ``φ``, so that

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j)

and the sums are computed once (non-causal) or as running sums (causal) instead of a T × T score matrix.

* ``feature_map: elu1`` — ``φ(x) = elu(x) + 1`` (Katharopoulos et al.). ``hedgehog`` — a learnable per-head
  ``W`` (starting at the identity) and ``φ(x) = softmax([Wx, −Wx])`` (Hedgehog, Zhang et al. 2024; LoLCATs), whose
  features can mimic softmax attention's spikiness; twice the feature width.
* ``heads`` — default: the replaced module's own head count (``num_heads``, ``num_attention_heads``, ``n_head``,
  or its transformers config's ``num_attention_heads``: Llama, Qwen2, Mistral attention), else one head per 64
  features. Grouped-query guides (fewer key/value heads) become full multi-head linear attention: the replacement's
  k and v are as wide as q.
* ``causal`` — default: the replaced module's ``is_causal`` (transformers' attention modules carry it; GPT-2's is
  true, BERT's false). A module that does not say (timm's ``Attention``) is refused until the recipe sets it: a
  decoder silently made non-causal would read the future.
* Causal form: chunked (``chunk`` tokens): within a chunk the masked φ(q)φ(k)ᵀ products, across chunks the running
  sums of φ(k)vᵀ carried as an exclusive cumulative sum over chunks — O(T·chunk + T·d) time and memory, every step a
  tensor operation (no Python loop over tokens). ``torch.export`` and the ONNX exporter built on it keep this form
  with the length symbolic (the padding to a multiple of ``chunk`` is computed in the graph). Under
  ``torch.jit.trace`` (TorchScript, and the older ONNX exporter that traces) the per-token form runs instead (one
  cumulative sum of φ(k)vᵀ over all tokens, O(T·d²) memory): the same numbers, without a padding that a trace
  would freeze to the example's length. On ONNX Runtime the chunked graph is the faster one (the edge benchmark's
  GPT-2 target at 128 tokens: 23 % less time per call in fp32, 33 % less as int8; docs/BENCHMARKS.md).

Masks and padding as ``elman_rnn``: the padding read from the ``attention_mask``/``attn_mask`` handed in is kept
out of every sum (its φ(k) and v are zero) and its outputs are zero, so a padded batch gives each sequence's own
outputs. There are no position terms inside, so left, right and inner padding alike change nothing. Other
arguments (caches, head masks, flags) are accepted and ignored; the output has the old module's structure.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from theseus_cli.replacements.layout import CHANNELS_HELP, Channels, channel_axis, widths, wrapped
from theseus_cli.replacements.registry import IOShapes, register
from theseus_cli.replacements.sequence import keep_mask, like_old
from theseus_cli.replacements.state import StreamingError, guide_layer_idx, state_slot

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


class LinearAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heads: Optional[int] = Field(None, ge=1, description="attention heads; default the replaced module's")
    feature_map: Literal["elu1", "hedgehog"] = "elu1"
    causal: Optional[bool] = Field(None, description="running sums (decoder) or whole-sequence sums; default the "
                                   "replaced module's is_causal")
    chunk: int = Field(64, ge=1, description="tokens per chunk of the causal form (memory/time trade-off only)")
    bias: bool = True
    channels: Channels = Field("auto", description=CHANNELS_HELP + "; positions become tokens in row-major order")


def _declared(old: nn.Module, names: tuple[str, ...]):
    """The first of ``names`` that ``old`` or one of its submodules carries as a plain bool/int attribute."""
    for module in old.modules():
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, (bool, int)) and not isinstance(value, nn.Module):
                return value
    return None


def resolved_heads(old: nn.Module, params: LinearAttentionParams, width: int) -> int:
    """``params.heads``, else the module's own head count (an attribute, or its transformers ``config``'s
    ``num_attention_heads``: Llama-style attention carries only the config), else one head per 64 features."""
    config_heads = getattr(getattr(old, "config", None), "num_attention_heads", None)
    config_heads = config_heads if isinstance(config_heads, int) and width % max(config_heads, 1) == 0 else None
    return params.heads or _declared(old, _HEAD_ATTRS) or config_heads or max(1, width // 64)


def resolved_causal(old: nn.Module, params: LinearAttentionParams) -> bool | None:
    if params.causal is not None:
        return params.causal
    found = _declared(old, ("is_causal",))
    return None if found is None else bool(found)


class FeatureMap(nn.Module):
    """φ applied per head: (B, H, T, d) → (B, H, T, f), positive."""

    def __init__(self, kind: str, heads: int, head_dim: int):
        super().__init__()
        self.kind = kind
        if kind == "hedgehog":
            self.weight = nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elu1":
            return F.elu(x) + 1
        z = torch.einsum("bhtd,hde->bhte", x, self.weight)
        return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)


class LinearAttention(nn.Module):
    """q, k, v projections → φ on q and k → kernelised attention per head → output projection."""

    eps = 1e-6  # added to the normaliser (every φ is positive, so it only matters at padded queries)

    def __init__(self, d_in: int, d_out: int, heads: int, feature_map: str, causal: bool, chunk: int = 64,
                 bias: bool = True, output_arity: int | None = None):
        super().__init__()
        if d_in % heads:
            raise ValueError(f"width {d_in} is not divisible by {heads} heads")
        self.heads, self.causal, self.chunk = heads, causal, chunk
        self.q, self.k, self.v = (nn.Linear(d_in, d_in, bias=bias) for _ in range(3))
        self.phi = FeatureMap(feature_map, heads, d_in // heads)
        self.out = nn.Linear(d_in, d_out, bias=bias)
        self.output_arity = output_arity
        self.layer_idx: int | None = None  # the cache slot for generation; set by the builder from the guide module

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, d)

    def forward(self, hidden_states, *args, **kwargs):
        x = hidden_states
        keep = keep_mask(kwargs, x.shape[0], x.shape[1])
        q, k, v = self.phi(self._split(self.q(x))), self.phi(self._split(self.k(x))), self._split(self.v(x))
        if keep is not None:
            mask = keep[:, None, :, None].to(k.dtype)
            k, v = k * mask, v * mask
        num, den = (causal_sums if self.causal else global_sums)(q, k, v, 0 if torch.jit.is_tracing() else self.chunk)
        num, den = self._carry(kwargs, q, k, v, num, den)
        y = (num / (den.unsqueeze(-1) + self.eps)).transpose(1, 2).flatten(2)
        out = self.out(y)
        if keep is not None:
            out = out * keep.unsqueeze(-1).to(out.dtype)
        return like_old(out, self.output_arity)

    def _carry(self, kwargs: dict, q, k, v, num, den):
        """Under generation: add the kept sums' contribution to this call's terms and keep the new sums."""
        slot = state_slot(kwargs, self.layer_idx, "linear_attention")
        if slot is None:
            return num, den
        if not self.causal:
            raise StreamingError("non-causal linear_attention cannot generate token by token (every output reads "
                                 "every token); generate with use_cache=False")
        kv, ksum = torch.einsum("bhtf,bhtd->bhfd", k, v), k.sum(2)
        if slot.state is not None:
            kv_before, k_before = slot.state
            num = num + torch.einsum("bhtf,bhfd->bhtd", q, kv_before)
            den = den + torch.einsum("bhtf,bhf->bht", q, k_before)
            kv, ksum = kv + kv_before, ksum + k_before
        slot.store((kv, ksum), q.shape[2])
        return num, den

    def extra_repr(self) -> str:
        return f"heads={self.heads}, feature_map={self.phi.kind}, causal={self.causal}, chunk={self.chunk}"


def global_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator (B, H, T, dv) and normaliser (B, H, T) of non-causal kernelised attention."""
    kv = torch.einsum("bhtf,bhtd->bhfd", k, v)
    return torch.einsum("bhtf,bhfd->bhtd", q, kv), torch.einsum("bhtf,bhf->bht", q, k.sum(2))


def causal_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and normaliser of causal kernelised attention: chunked, or per token where ``chunk`` is 0 (see
    the module docstring)."""
    if chunk == 0:
        kv = torch.cumsum(torch.einsum("bhtf,bhtd->bhtfd", k, v), dim=2)
        return torch.einsum("bhtf,bhtfd->bhtd", q, kv), torch.einsum("bhtf,bhtf->bht", q, torch.cumsum(k, dim=2))
    b, h, t, f = q.shape
    n = (t + chunk - 1) // chunk  # not -(-t // chunk): ONNX exports a SymInt // as a truncating Div
    pad = n * chunk - t  # zero keys and values at the end: they precede no real query
    q, k, v = (F.pad(z, (0, 0, 0, pad)).view(b, h, n, chunk, z.shape[-1]) for z in (q, k, v))
    scores = torch.einsum("bhncf,bhnsf->bhncs", q, k).tril()  # within a chunk: keys s ≤ query c
    kv = torch.einsum("bhncf,bhncd->bhnfd", k, v)
    before = torch.cumsum(kv, dim=2) - kv  # Σ over earlier chunks
    k_before = torch.cumsum(k.sum(3), dim=2) - k.sum(3)
    num = torch.einsum("bhncs,bhnsd->bhncd", scores, v) + torch.einsum("bhncf,bhnfd->bhncd", q, before)
    den = scores.sum(-1) + torch.einsum("bhncf,bhnf->bhnc", q, k_before)
    return num.reshape(b, h, n * chunk, -1)[:, :, :t], den.reshape(b, h, n * chunk)[:, :, :t]


def _fits(old: nn.Module, params: LinearAttentionParams, shapes: IOShapes) -> str | None:
    axis, why = channel_axis(old, shapes, params.channels)
    if why:
        return why
    width = widths(shapes, axis)[0]
    if len(shapes.input) > 2 and resolved_causal(old, params):
        return f"the positions of a {tuple(shapes.input)} activation have no causal order; set params.causal: false"
    heads = resolved_heads(old, params, width)
    if width % heads:
        return f"width {width} is not divisible by {heads} heads (set params.heads)"
    if resolved_causal(old, params) is None:
        return (f"cannot tell whether {type(old).__name__} attends causally (it has no is_causal attribute); "
                "set params.causal: true for a decoder, false for an encoder or a ViT")
    return None


@register("linear_attention", params=LinearAttentionParams, accepts=(nn.Module,), interface="sequence", fits=_fits, layouts=True,
          summary="attention → kernelised linear attention (elu1 or hedgehog features; causal or not)")
def build_linear_attention(old: nn.Module, params: LinearAttentionParams, shapes: IOShapes) -> nn.Module:
    axis = channel_axis(old, shapes, params.channels)[0]
    d_in, d_out = widths(shapes, axis)
    causal = resolved_causal(old, params)
    new = LinearAttention(d_in, d_out, resolved_heads(old, params, d_in), params.feature_map, bool(causal),
                          params.chunk, params.bias, shapes.output_arity)
    new.layer_idx = guide_layer_idx(old)
    return wrapped(new, shapes, axis)
