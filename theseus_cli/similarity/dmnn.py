"""Differentiable mutual nearest neighbours (D-MNN, the paper's Appendix C.2).

Rows (samples of a batch) are ℓ2-normalised; the similarity of anchor i to
j ≠ i is the cosine φᵢᵀφⱼ/τ. For each anchor, P is the guide's softmax over
its own top-k neighbours (zero elsewhere) and the loss is
KL(P ‖ Q) = mean_i Σ_j P_ij (log P_ij − log Q_ij).

Design decision where the paper is silent: Q, the target's distribution, is
the softmax over the union of the target's own top-k and the guide's top-k.
With Q restricted to the target's top-k alone (eq. 14 read literally), any
guide neighbour missing from the target's top-k gives Q_ij = 0 and an
infinite KL with no gradient to pull it in; the union keeps the loss finite
and pushes exactly those missing neighbours up. The reported *similarity*
(:func:`soft_mnn`) uses each side's own top-k, as eq. 15 defines it, and
k·soft_mnn tends to the hard mutual-kNN overlap (eq. 10, :func:`mutual_knn`)
as τ → 0.
"""

from __future__ import annotations

import torch

from theseus_cli.similarity.cka import normalise_rows
from theseus_cli.similarity.registry import LossFn, register_similarity


def _logits(x: torch.Tensor, tau: float) -> torch.Tensor:
    """(n, ...) → (n, n) cosine similarities / τ, −inf on the diagonal (an anchor is not its own neighbour).

    Computed in float32, or float64 when the input is float64 (half precisions are promoted)."""
    x = normalise_rows(x, torch.promote_types(x.dtype, torch.float32))
    s = (x @ x.T) / tau
    return s.masked_fill(torch.eye(s.shape[0], dtype=torch.bool, device=s.device), float("-inf"))


def _topk_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    """(n, n) bool: True at each row's k largest entries."""
    idx = s.topk(k, dim=1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)


def _masked_log_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(s.masked_fill(~mask, float("-inf")), dim=1)


def _check(a: torch.Tensor, b: torch.Tensor, k: int) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"D-MNN needs the same samples on both sides: {a.shape[0]} vs {b.shape[0]} rows")
    if not 1 <= k <= a.shape[0] - 1:
        raise ValueError(f"D-MNN with k={k} needs a batch of at least {k + 1} samples, got {a.shape[0]}")


def dmnn_loss(target: torch.Tensor, guide: torch.Tensor, k: int = 10, tau: float = 0.1) -> torch.Tensor:
    """KL(P_guide ‖ Q_target) averaged over anchors (eq. 16); ≥ 0, finite."""
    _check(target, guide, k)
    with torch.autocast(device_type=target.device.type, enabled=False):
        sg, st = _logits(guide, tau), _logits(target, tau)  # (n, n) each
        mask_g = _topk_mask(sg, k)
        log_p = _masked_log_softmax(sg, mask_g)
        log_q = _masked_log_softmax(st, mask_g | _topk_mask(st, k))
        # outside the guide's top-k, log P is −inf and P is 0: zero those entries before the product, not after,
        # or 0·(−inf) puts NaN into the gradients (of the guide side too, when it requires grad)
        log_p, log_q = (torch.where(mask_g, t, torch.zeros_like(t)) for t in (log_p, log_q))
        p = torch.where(mask_g, log_p.exp(), torch.zeros_like(log_p))
        return (p * (log_p - log_q)).sum(1).mean()


def soft_mnn(a: torch.Tensor, b: torch.Tensor, k: int = 10, tau: float = 0.1) -> torch.Tensor:
    """ḡ_soft = mean_i Σ_j P_ij Q_ij with each side's own top-k (eq. 15); in [0, 1/k]."""
    _check(a, b, k)
    sa, sb = _logits(a, tau), _logits(b, tau)
    p = _masked_log_softmax(sa, _topk_mask(sa, k)).exp()
    q = _masked_log_softmax(sb, _topk_mask(sb, k)).exp()
    return (p * q).sum(1).mean()


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Hard mutual-kNN overlap |S_a(i) ∩ S_b(i)| / k averaged over anchors (eq. 10); in [0, 1]."""
    _check(a, b, k)
    ma, mb = _topk_mask(_logits(a, 1.0), k), _topk_mask(_logits(b, 1.0), k)
    return (ma & mb).sum(1).float().mean() / k


@register_similarity("dmnn", min_batch=lambda k: k + 1, description="differentiable mutual nearest neighbours "
                     "(needs k neighbours besides the anchor)")
def _dmnn(k: int, tau: float) -> LossFn:
    return lambda target, guide: dmnn_loss(target, guide, k, tau)
