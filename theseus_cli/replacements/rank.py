"""What the low-rank replacements share: the rank parameters and the truncated-SVD start.

A rank-``r`` factorisation of a weight ``W`` (out × in) is ``B·A`` with ``A`` (r × in) and ``B`` (out × r). The
paper starts every replacement from random weights and lets alignment find it; ``init: svd`` (an option beyond the
paper) starts from the best rank-``r`` approximation of the guide's own weight instead (Eckart–Young: the truncated
SVD, ``A = √S·Vᵀ``, ``B = U·√S``, the singular values split evenly so both factors have the same scale). At full
rank the factorisation then reproduces the guide's module exactly before any training.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from theseus_cli.replacements.registry import start_from_weights


class RankParams(BaseModel):
    """``rank`` (an absolute width) or ``rank_ratio`` (a fraction of the weight's full rank), not both."""

    model_config = ConfigDict(extra="forbid")

    rank: Optional[int] = Field(None, ge=1, description="width of the bottleneck between the two factors")
    rank_ratio: Optional[float] = Field(None, gt=0, le=1, description="bottleneck as a fraction of the full rank "
                                        "min(out, in) of the replaced weight, rounded, at least 1")
    init: Literal["random", "svd"] = Field("random", description="random (the paper) or the truncated SVD of the "
                                           "guide module's weight")

    @model_validator(mode="after")
    def _one_rank(self) -> "RankParams":
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError("give rank or rank_ratio, not both")
        return self

    def resolve(self, full: int, default: int) -> int:
        """The bottleneck width for a weight of full rank ``full``; ``default`` (capped at ``full``) when neither
        ``rank`` nor ``rank_ratio`` is given."""
        if self.rank is not None:
            return self.rank
        if self.rank_ratio is not None:
            return max(1, round(self.rank_ratio * full))
        return min(default, full)

    def too_high(self, full: int, what: str) -> str | None:
        """Why an explicit ``rank`` above the full rank is refused: that is no factorisation, only a wider layer."""
        if self.rank is not None and self.rank > full:
            return f"rank {self.rank} exceeds the full rank {full} of {what}; use rank ≤ {full} or rank_ratio"
        return None


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``weight`` (out × in), computed in float64
    on the CPU (the guide may live on a GPU in bf16) and returned in float32."""
    u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root[None, :]).float()


def load_factors(down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, rank: int) -> None:
    """Copy the truncated SVD of ``weight`` (out × in) into the factor weights ``down`` (rank × in, any trailing
    kernel dims) and ``up`` (out × rank, any trailing 1s) in place. Skipped on the meta device, where the plan
    builds replacements only to count their parameters, and where saved weights follow (:func:`weights_follow`)."""
    if down.is_meta or up.is_meta or not start_from_weights():
        return
    a, b = svd_factors(weight, rank)
    with torch.no_grad():
        down.copy_(a.reshape(down.shape))
        up.copy_(b.reshape(up.shape))
