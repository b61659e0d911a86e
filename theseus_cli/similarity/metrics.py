"""Every metric at once, for reports: whatever was optimised, a user can find bottleneck layers under all of them."""

from __future__ import annotations

import torch

from theseus_cli.similarity.cka import MIN_BATCH, linear_cka, unbiased_cka
from theseus_cli.similarity.dmnn import mutual_knn


def all_similarities(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Linear CKA, unbiased CKA and hard mutual-kNN overlap, in float64 where it matters (each where defined)."""
    out = {"cka": float(linear_cka(a, b, dtype=torch.float64))} if a.shape[0] >= MIN_BATCH["cka"] else {}
    if a.shape[0] >= 4:
        out["ucka"] = float(unbiased_cka(a, b, dtype=torch.float64))
    if a.shape[0] > k:
        out["mknn"] = float(mutual_knn(a, b, k))
    return out
