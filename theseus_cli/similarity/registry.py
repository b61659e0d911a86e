"""The registry of similarity losses (``similarity.kind`` in a recipe): one factory and one decorator each.

A factory takes the recipe's ``k`` and ``tau`` and returns ``loss(target_rows, guide_rows)``, the dissimilarity
alignment minimises; ``min_batch(k)`` is the smallest batch the metric is defined on (checked before any work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from theseus_cli.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Similarity:
    name: str
    make: Callable[[int, float], LossFn]
    min_batch: Callable[[int], int]
    description: str


SIMILARITIES: Registry[Similarity] = Registry("similarity")


def register_similarity(name: str, *, min_batch: Callable[[int], int], description: str):
    def decorator(make: Callable[[int, float], LossFn]) -> Callable[[int, float], LossFn]:
        SIMILARITIES.add(name, Similarity(name, make, min_batch, description))
        return make

    return decorator


def get_similarity(kind: str) -> Similarity:
    return SIMILARITIES.lookup(kind)


def make_loss(kind: str, k: int = 10, tau: float = 0.1) -> LossFn:
    """The dissimilarity ``loss(target, guide)`` a recipe's ``similarity`` section selects."""
    return get_similarity(kind).make(k, tau)


def min_batch(kind: str, k: int = 10) -> int:
    """Smallest batch a similarity is defined on."""
    return get_similarity(kind).min_batch(k)
