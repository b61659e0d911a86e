"""Procrustes maps between the activations of two models of different width (task-vector transport).

For each module present in both models, the calibration batch gives its input rows ``X`` and
output rows ``Y`` in model A (width a) and model B (width b): every sample, and every token or
spatial position of it, is a row; features are the channel axis (dim 1) for convolutions and
BatchNorm, else the last axis. With ``C = X_Aᵀ X_B`` (float64, summed over batches, centred by
default, optionally partially whitened: ``G_A^-p C G_B^-p``), the thin SVD ``C = U S Vᵀ``
gives ``T = U Vᵀ`` (a × b), the semi-orthogonal map closest to relating the two feature bases:
``T Tᵀ = I`` when a ≤ b (B wider: exact, norm-preserving) and ``Tᵀ T = I`` when a ≥ b
(B narrower: a projection). A tiny ridge on the rectangular identity breaks ties in directions
the data does not excite, so identical models get ``T = I`` exactly even with dead units; it is sized
from the Grams the SVD sees (the whitened ones when ``whiten`` > 0), so it never outweighs the data.

Map quality is ``Σ S / √(tr G_A · tr G_B)`` in [0, 1]: 1 when B's features are an exact
rotation of A's on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

RIDGE = 1e-9  # relative to the mean diagonal of the Grams; far below the prior, so only the last tie-breaker


def channel_first(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


def rows(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(rows, features) float64 view of an activation of ``module``."""
    t = t.detach()
    if channel_first(module) and t.dim() >= 2:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1]).double()


def match_rows(a: torch.Tensor, b: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``b`` resampled to ``a``'s positions when the two models' grids differ (feature axis kept)."""
    if a.shape[:1] != b.shape[:1]:
        raise ValueError(f"batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
    cf = channel_first(module)
    grid_a = a.shape[2:] if cf else a.shape[1:-1]
    grid_b = b.shape[2:] if cf else b.shape[1:-1]
    if grid_a == grid_b:
        return b
    x = b if cf else b.movedim(-1, 1)  # (N, C, *grid)
    x = F.interpolate(x.float(), size=tuple(grid_a), mode="linear" if len(grid_a) == 1 else "bilinear",
                      align_corners=False)
    return x if cf else x.movedim(1, -1)


@dataclass
class CrossStats:
    """Streaming float64 sums for one (A side, B side) pair of activations."""

    n: int = 0
    sum_a: torch.Tensor | None = None
    sum_b: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    gram_a: torch.Tensor | None = None
    gram_b: torch.Tensor | None = None

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if self.cross is None:
            self.sum_a, self.sum_b = xa.new_zeros(xa.shape[1]), xb.new_zeros(xb.shape[1])
            self.cross = xa.new_zeros(xa.shape[1], xb.shape[1])
            self.gram_a, self.gram_b = xa.new_zeros(xa.shape[1], xa.shape[1]), xb.new_zeros(xb.shape[1], xb.shape[1])
        self.n += xa.shape[0]
        self.sum_a += xa.sum(0)
        self.sum_b += xb.sum(0)
        self.cross += xa.T @ xb
        self.gram_a += xa.T @ xa
        self.gram_b += xb.T @ xb


def _whitening(g: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^-p, the mean diagonal of the whitened Gram G^-p G G^-p = G^(1-2p)): the scale the tie-breaking ridge
    must be measured against once the cross-covariance is whitened."""
    vals, vecs = torch.linalg.eigh(g)
    vals = vals.clamp_min(vals.max().clamp_min(1e-30) * 1e-10)
    return (vecs * vals.pow(-p)) @ vecs.T, vals.pow(1 - 2 * p).mean()


@dataclass
class Map:
    t: torch.Tensor  # (a, b), float64
    quality: float
    rows: int


PRIOR = 1e-4  # weight of the prior, relative to the norm of the cross-covariance


def centered_cross(s: CrossStats, center: bool = True) -> torch.Tensor:
    return s.cross - s.n * torch.outer(s.sum_a / s.n, s.sum_b / s.n) if center else s.cross


def procrustes(s: CrossStats, center: bool = True, whiten: float = 0.0,
               blocks: int = 1, prior: torch.Tensor | None = None) -> Map:
    """The map from ``s``; with ``blocks`` > 1 (fused q/k/v) one map per diagonal block, assembled block-diagonally.

    ``prior`` (a × b, e.g. the similarity of the two modules' weight rows) only decides directions the
    calibration data leaves undetermined: it is added at 1e-4 of the cross-covariance's norm. A layer
    that widens (8 inputs → 16 outputs) has rank-deficient outputs; there, data alone cannot place
    half of the units, and the prior can."""
    c, ga, gb = s.cross.clone(), s.gram_a.clone(), s.gram_b.clone()
    if center:
        ma, mb = s.sum_a / s.n, s.sum_b / s.n
        c -= s.n * torch.outer(ma, mb)
        ga -= s.n * torch.outer(ma, ma)
        gb -= s.n * torch.outer(mb, mb)
    a, b = c.shape
    if a % blocks or b % blocks:
        raise ValueError(f"{a}×{b} features do not split into {blocks} blocks")
    ka, kb = a // blocks, b // blocks
    t = torch.zeros_like(c)
    singular = 0.0
    for i in range(blocks):
        sa, sb = slice(i * ka, (i + 1) * ka), slice(i * kb, (i + 1) * kb)
        ci, gai, gbi = c[sa, sb], ga[sa, sa], gb[sb, sb]
        scale = (torch.diagonal(gai).mean() + torch.diagonal(gbi).mean()) / 2
        if whiten > 0:  # the ridge is sized from the Grams of what the SVD sees: the whitened ones
            (wa, scale_a), (wb, scale_b) = _whitening(gai, whiten), _whitening(gbi, whiten)
            ci, scale = wa @ ci @ wb, (scale_a + scale_b) / 2
        if prior is not None:
            pi = prior[sa, sb].to(ci.dtype)
            if float(pi.norm()) > 0:
                ci = ci + PRIOR * float(ci.norm()) / float(pi.norm()) * pi
        ridge = RIDGE * scale.clamp_min(1e-30) * torch.eye(ka, kb, dtype=c.dtype, device=c.device)
        u, sv, vh = torch.linalg.svd(ci + ridge, full_matrices=False)
        t[sa, sb] = u @ vh
        singular += float(torch.linalg.svdvals(c[sa, sb]).sum())
    denom = float(torch.sqrt(torch.trace(ga).clamp_min(0) * torch.trace(gb).clamp_min(0)))
    return Map(t, singular / denom if denom > 0 else 0.0, s.n)


@dataclass
class PointStats:
    """Input and output statistics of one module."""

    inputs: CrossStats = field(default_factory=CrossStats)
    outputs: CrossStats = field(default_factory=CrossStats)
