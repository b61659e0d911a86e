"""``identity``: drop a module whose output has its input's shape (layer dropping).

A residual block (ResNet's ``BasicBlock``, a transformer block) adds its work to what it is handed; without it,
the network still runs, one block shallower. ``identity`` stands in for such a module with the call interface of
the ``sequence`` replacements: it takes the hidden states (positionally or as ``hidden_states=``), ignores every
other argument (masks, caches, flags) and returns them unchanged in the structure the old module returned. It
has no weights, so an alignment stage that introduces only identities trains nothing (0 steps); the modules
after it learn to do without it. Where the input and output shapes differ (a downsampling block) it does not fit,
and the plan says so. ``theseus search`` offers it as an alternative next to ``keep``.
"""

from __future__ import annotations

import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from theseus_cli.replacements.registry import IOShapes, register
from theseus_cli.replacements.sequence import like_old


class IdentityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dropped(nn.Module):
    """The hidden states, unchanged, in the old module's output structure."""

    def __init__(self, output_arity: int | None = None):
        super().__init__()
        self.output_arity = output_arity

    def forward(self, hidden_states, *args, **kwargs):
        return like_old(hidden_states, self.output_arity)


def _identity_fits(old: nn.Module, params: IdentityParams, shapes: IOShapes) -> str | None:
    if tuple(shapes.input) != tuple(shapes.output):
        return f"identity drops only a module whose output has its input's shape; saw {shapes.input} → {shapes.output}"
    return None


@register("identity", params=IdentityParams, accepts=(nn.Module,), interface="sequence", fits=_identity_fits,
          layouts=True, summary="drop a shape-preserving module (a residual or transformer block): layer dropping")
def build_identity(old: nn.Module, params: IdentityParams, shapes: IOShapes) -> nn.Module:
    return Dropped(shapes.output_arity)
