"""Feature regression (``similarity.kind: mse``): the relative squared error between the replacement's activations
and the guide's, element by element.

CKA, unbiased CKA and D-MNN are invariant to rotations (and CKA to scale) of the features: they let a replacement
answer in any basis, which is what the paper needs when every module is replaced and the next replacement can
learn to read that basis. A replacement *inside* a kept architecture (a convolution made separable or low-rank,
with the guide's BatchNorm, activation and residual additions around it) must answer in the guide's own basis, or
the kept parts downstream read garbage: a residual sum adds a rotated branch to an unrotated shortcut. There the
loss is ``‖t − g‖² / ‖g‖²`` over the batch (FitNets-style hint regression, normalised so that its value does not
depend on the layer's scale: 0 is an exact match, 1 is as far as predicting zeros). Rows are not ℓ2-normalised,
unlike the other similarities: scale is part of what must match. It needs equal shapes, so architecture transfers
(blocks of different widths) are refused by the recipe.
"""

from __future__ import annotations

import torch

from theseus_cli.similarity.registry import LossFn, register_similarity

_EPS = 1e-12


def relative_mse(target: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """``‖target − guide‖² / ‖guide‖²`` in float32 (float64 for float64 inputs); 0 for an all-zero guide matched."""
    dtype = torch.promote_types(target.dtype, torch.float32)
    t, g = target.flatten(1).to(dtype), guide.flatten(1).to(dtype)
    if t.shape != g.shape:
        raise ValueError(f"mse compares equal shapes; got target {tuple(t.shape)} and guide {tuple(g.shape)}")
    return (t - g).pow(2).sum() / g.pow(2).sum().clamp_min(_EPS)


@register_similarity("mse", min_batch=lambda k: 1, description="relative squared error to the guide's activations "
                     "(basis-sensitive: for replacements inside a kept architecture)")
def _mse(k: int, tau: float) -> LossFn:
    return relative_mse
