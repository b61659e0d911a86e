"""Tolerances for float32 results checked against float64 references, derived from the dtype and the quantity.

A float32 result differs from its exact value by rounding in every operation. How much depends on the kernels
(Intel and AMD CPUs, and ATen's AVX2 / AVX-512 / default builds, sum in different orders and fuse differently), so a
test may never compare against a tolerance tuned to one machine's bits. What bounds the error is the size of what
was rounded, not of the result: a small difference of large sums (a KL divergence of near-equal distributions, a
loss near zero) carries the absolute error of its terms. So the tolerance here is absolute, ``c · eps · magnitude``,
where ``magnitude`` is the sum of the absolute sizes of the terms that were added up (the caller computes it from
its reference, in float64), and ``c`` covers the chain of operations each term went through and the worst-case
growth of a length-``n`` sum (``n · eps``; pairwise and blocked sums do far better, and the bound must hold on any
of them).
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the spacing of float32 numbers at 1


def f32_tolerance(magnitude: float, terms: int = 1, ops: int = 4) -> float:
    """Absolute tolerance for a float32 result that sums ``terms`` quantities of total absolute size ``magnitude``,
    each from about ``ops`` rounded operations: ``(ops + terms) · eps · magnitude``."""
    return (ops + terms) * EPS32 * max(magnitude, math.ulp(1.0))


def kl_magnitude(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """The absolute size of what a softened KL divergence sums, per row on average, times T²: every term
    ``p (log p − log q)`` with ``log p = z/T − logsumexp(z/T)`` is rounded at the size of its parts, not of the
    (possibly tiny) divergence."""
    s, te = student.double() / t, teacher.double() / t
    p = torch.softmax(te, -1)
    parts = te.abs() + te.logsumexp(-1, keepdim=True).abs() + s.abs() + s.logsumexp(-1, keepdim=True).abs()
    return float(t * t * (p * parts).sum(-1).mean())
