"""Representational similarity as pure tensor functions.

Three similarities, each with its dissimilarity used as an alignment loss:
linear CKA (``cka``), unbiased CKA (``ucka``) and differentiable mutual
nearest neighbours (``dmnn``). All of them ℓ2-normalise rows (samples) first,
as the paper does.

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
never NaN; nearly degenerate ones (rows almost parallel) are rescaled before
the reductions, so they are not mistaken for degenerate ones. CKA of two
samples is identically 1 (two centred rows span one direction on both sides),
so linear CKA needs at least 3 samples and unbiased CKA 4.
"""

from __future__ import annotations

import torch

from theseus_cli.similarity.registry import LossFn, register_similarity

_EPS = 1e-12
MIN_BATCH = {"cka": 3, "ucka": 4}  # CKA of 2 samples is identically 1: no signal to align on


def normalise_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, ...) → (n, d): flattened, each row (sample) ℓ2-normalised, as every metric here starts."""
    x = x.flatten(1).to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)


def sequence_rows(a: torch.Tensor, mode: str = "flatten", mask: torch.Tensor | None = None,
                  max_rows: int | None = None) -> torch.Tensor:
    """Rows to compare for activations ``a``; only sequence activations (B, T, D) are affected.

    ``flatten`` (the paper): one row per sample, its T·D features (padded positions zeroed, so
    padding contributes nothing). ``per-token``: one row per real token, (Σ mask, D) — similarity
    of token representations irrespective of which sample they came from. ``max_rows`` keeps an
    evenly strided subset (neighbour-based metrics cost O(rows²) memory).
    """
    if a.dim() != 3:
        return a
    if mode == "flatten":
        return a if mask is None else a * mask.unsqueeze(-1).to(a.dtype)
    rows = a.reshape(-1, a.shape[-1]) if mask is None else a[mask.bool()]
    if max_rows is not None and rows.shape[0] > max_rows:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows, device=rows.device).long()]
    return rows


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, ...) → (n, d): flattened, rows ℓ2-normalised, columns centred, then scaled to unit Frobenius norm.

    CKA is invariant to that scale, and it is what keeps the HSIC terms of order 1. Nearly parallel rows
    (a common offset in every feature, as after a late ReLU) centre to tiny values, and their self-HSIC
    (fourth power of that size) would otherwise fall under any absolute floor, collapsing CKA towards 0
    where the float64 reference gives e.g. 0.47. What is left after centring only counts when it is above
    the rounding noise of centring itself (a few ulps of the unit-norm rows); below that the input is
    constant and the similarity is 0, with finite gradients.
    """
    x = normalise_rows(x, dtype)
    x = x - x.mean(dim=0, keepdim=True)
    size = x.norm()
    noise = 64 * torch.finfo(x.dtype).eps * x.shape[0] ** 0.5
    return x * torch.where(size > noise, 1.0 / size.clamp_min(noise), torch.zeros_like(size))


def gram_is_cheaper(n: int, d1: int, d2: int) -> bool:
    return n * n * (d1 + d2) <= n * (d1 * d2 + d1 * d1 + d2 * d2)


def linear_cka(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Linear CKA between a (n, ...) and b (n, ...) → scalar in [0, 1]."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides: {a.shape[0]} vs {b.shape[0]} rows")
    if a.shape[0] < MIN_BATCH["cka"]:
        raise ValueError(f"CKA needs at least {MIN_BATCH['cka']} samples (of 2 it is always 1), got {a.shape[0]}")
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


def _hsic_u_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al., 2007) of K = AAᵀ and L = BBᵀ, without forming n×n matrices when cheaper.

    With K̃, L̃ the Grams with zeroed diagonals:
      HSIC_U = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).
    (The paper's eq. 9 prints tr(K̃L̃) in all three terms; this is the estimator it cites.)
    """
    n = a.shape[0]
    dk = a.square().sum(1)  # diag(K), (n,)
    dl = b.square().sum(1)  # diag(L), (n,)
    if gram_is_cheaper(n, a.shape[1], b.shape[1]):
        k = a @ a.T - torch.diag(dk)  # K̃ (n, n)
        l = b @ b.T - torch.diag(dl)  # L̃ (n, n)
        tr_kl = (k * l).sum()
        k1, l1 = k.sum(1), l.sum(1)  # K̃1, L̃1 (n,)
    else:
        tr_kl = (b.T @ a).square().sum() - (dk * dl).sum()  # tr(KL) − Σ K_ii L_ii
        k1 = a @ a.sum(0) - dk  # (n,)
        l1 = b @ b.sum(0) - dl
    return (tr_kl + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


def unbiased_cka(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CKA with the unbiased HSIC estimator (Appendix C.1.1): no inflation from the Gram diagonals. Needs n ≥ 4."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides: {a.shape[0]} vs {b.shape[0]} rows")
    if a.shape[0] < 4:
        raise ValueError(f"unbiased CKA needs at least 4 samples per batch, got {a.shape[0]}")
    with torch.autocast(device_type=a.device.type, enabled=False):
        # HSIC_U is shift-invariant (centring helps precision); rows of mean norm 1 keep its terms far from the floor
        n = a.shape[0]
        a, b = _prepare(a, dtype) * n**0.5, _prepare(b, dtype) * n**0.5
        ab, aa, bb = _hsic_u_terms(a, b), _hsic_u_terms(a, a), _hsic_u_terms(b, b)
        return ab / (aa.clamp_min(_EPS) * bb.clamp_min(_EPS)).sqrt()


def ucka_loss(target: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    return 1.0 - unbiased_cka(target, guide)


@register_similarity("cka", min_batch=lambda k: MIN_BATCH["cka"], description="linear CKA (the paper's default)")
def _cka(k: int, tau: float) -> LossFn:
    return cka_loss


@register_similarity("ucka", min_batch=lambda k: MIN_BATCH["ucka"], description="unbiased CKA (Appendix C.1.1)")
def _ucka(k: int, tau: float) -> LossFn:
    return ucka_loss
