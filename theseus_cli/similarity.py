"""Representational similarity as pure tensor functions.

Linear CKA (Kornblith et al., 2019) as the paper uses it (Appendix C.1): rows
are samples, features are flattened, each row is ℓ2-normalised first, then

    CKA(A, B) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),  K = A Aᵀ, L = B Bᵀ,
    HSIC(K, L) = tr(H K H · H L H),  H = I − 11ᵀ/n.

Centering the columns of A and B and forming Gram matrices is the same as
H K H. The same number can be computed in *Gram form* (n×n matrices, cost
n²(d₁+d₂)) or in *feature form* (‖Bᵀ A‖²_F etc., cost n(d₁d₂+d₁²+d₂²));
:func:`linear_cka` picks whichever is cheaper, so a batch of 256 samples with
50k-wide conv features costs a 256×256 Gram, not a 50k×50k covariance.

Inputs of any float dtype are computed in float32 (float64 on request), so
bf16/fp16 activations do not destroy the reductions. Degenerate inputs
(constant or all-zero activations) give similarity 0 and finite gradients,
never NaN.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, ...) → (n, d): flattened, rows ℓ2-normalised, columns centred."""
    x = x.flatten(1).to(dtype)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return x - x.mean(dim=0, keepdim=True)


def gram_is_cheaper(n: int, d1: int, d2: int) -> bool:
    return n * n * (d1 + d2) <= n * (d1 * d2 + d1 * d1 + d2 * d2)


def linear_cka(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Linear CKA between a (n, ...) and b (n, ...) → scalar in [0, 1]."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides: {a.shape[0]} vs {b.shape[0]} rows")
    if a.shape[0] < 2:
        raise ValueError("CKA needs at least 2 samples")
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = _prepare(a, dtype), _prepare(b, dtype)  # (n, d1), (n, d2)
        n, d1, d2 = a.shape[0], a.shape[1], b.shape[1]
        if gram_is_cheaper(n, d1, d2):
            k, l = a @ a.T, b @ b.T  # (n, n) each
            hsic_ab, hsic_aa, hsic_bb = (k * l).sum(), (k * k).sum(), (l * l).sum()
        else:
            hsic_ab = (b.T @ a).square().sum()  # (d2, d1)
            hsic_aa = (a.T @ a).square().sum()  # (d1, d1)
            hsic_bb = (b.T @ b).square().sum()  # (d2, d2)
        return hsic_ab / (hsic_aa.clamp_min(_EPS) * hsic_bb.clamp_min(_EPS)).sqrt()


def cka_loss(target: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Δ = 1 − CKA(target, guide): the dissimilarity minimised during alignment."""
    return 1.0 - linear_cka(target, guide)


SIMILARITIES = {"cka": linear_cka}
LOSSES = {"cka": cka_loss}
