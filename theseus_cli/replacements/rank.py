"""What the low-rank replacements share: the rank parameters and the truncated-SVD start.

A rank-``r`` factorisation of a weight ``W`` (out × in) is ``B·A`` with ``A`` (r × in) and ``B`` (out × r). The
paper starts every replacement from random weights and lets alignment find it; ``init: svd`` (an option beyond the
paper) starts from the best rank-``r`` approximation of the guide's own weight instead (Eckart–Young: the truncated
SVD, ``A = √S·Vᵀ``, ``B = U·√S``, the singular values split evenly so both factors have the same scale). At full
rank the factorisation then reproduces the guide's module exactly before any training.

``init: activation_svd`` (also beyond the paper) is best on the inputs the module actually receives rather than on
all inputs alike: with ``C`` the second moment of the module's input features over ``calibration`` training inputs,
it minimises ``E‖(W − BA)x‖² = ‖(W − BA)C^½‖²``, so it takes the truncated SVD ``U·S·Vᵀ`` of ``W·C^½`` and sets
``A = √S·Vᵀ·C^−½``, ``B = U·√S`` (the whitening of SVD-LLM; ASVD scales by activations the same way). Why: a
pretrained transformer's feed-forward weights are not low-rank, but the activations they see are; at half the full
rank the plain SVD of all-MiniLM-L6-v2's feed-forward layers kept a sentence-embedding cosine of 0.67 to the
guide, this start 0.94 (held-out verses, before any training). ``C`` is damped by 10⁻⁴ of its mean diagonal so
directions the inputs never take stay finite; at full rank ``BA = W`` still. Where no inputs reach the builder (the
baselines' fresh weights, which hold nothing to keep) it is the plain SVD.
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
    init: Literal["random", "svd", "activation_svd"] = Field(
        "random", description="random (the paper), the truncated SVD of the guide module's weight, or its truncated "
        "SVD weighted by the inputs the module receives (activation_svd: Linear/Conv1D)")
    calibration: int = Field(512, ge=1, description="activation_svd: training inputs (in a seeded random order) whose "
                             "activations at the module estimate its input statistics")

    @model_validator(mode="after")
    def _one_rank(self) -> "RankParams":
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError("give rank or rank_ratio, not both")
        return self

    @property
    def wants_input_moment(self) -> bool:
        """Whether the builder needs the second moment of the module's inputs (``IOShapes.input_moment``)."""
        return self.init == "activation_svd"

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


MOMENT_DAMPING = 1e-4  # of the moment's mean diagonal: input directions never seen keep finite factor weights


def _whitening(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^½, C^−½)`` of the damped, scale-normalised second moment ``C`` (in × in), float64."""
    c = moment.detach().to("cpu", torch.float64)
    c = c / c.diagonal().mean().clamp_min(1e-300)
    c = c + MOMENT_DAMPING * torch.eye(c.shape[0], dtype=c.dtype)
    values, vectors = torch.linalg.eigh(c)
    values = values.clamp_min(MOMENT_DAMPING)  # eigh of a damped PSD matrix: negative round-off only
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def svd_factors(weight: torch.Tensor, rank: int, moment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``weight`` (out × in) — in the plain
    Frobenius norm, or with ``moment`` (the inputs' second moment, in × in) on those inputs — computed in float64 on
    the CPU (the guide may live on a GPU in bf16) and returned in float32."""
    w = weight.detach().to("cpu", torch.float64)
    half, inv_half = _whitening(moment) if moment is not None else (None, None)
    u, s, vh = torch.linalg.svd(w if half is None else w @ half, full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    return (a if inv_half is None else a @ inv_half).float(), (u[:, :rank] * root[None, :]).float()


def load_factors(down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, rank: int,
                 moment: torch.Tensor | None = None) -> None:
    """Copy the truncated SVD of ``weight`` (out × in; weighted by the inputs' second moment ``moment`` where
    given) into the factor weights ``down`` (rank × in, any trailing kernel dims) and ``up`` (out × rank, any
    trailing 1s) in place. Skipped on the meta device, where the plan builds replacements only to count their
    parameters, and where saved weights follow (:func:`weights_follow`)."""
    if down.is_meta or up.is_meta or not start_from_weights():
        return
    a, b = svd_factors(weight, rank, moment)
    with torch.no_grad():
        down.copy_(a.reshape(down.shape))
        up.copy_(b.reshape(up.shape))
