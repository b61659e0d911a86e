"""``load_dataset``: the data set a recipe's ``data`` section names, whatever kind its source is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from theseus_cli.data.core import Dataset, batches_per_epoch, iterate_batches, subset  # noqa: F401  (public here)
from theseus_cli.data.images import FASHION_MNIST_DIR, load_image_dataset  # noqa: F401
from theseus_cli.data.sources import get_source
from theseus_cli.data.text import load_text_dataset

if TYPE_CHECKING:
    from theseus_cli.config.recipe import DataConfig


def load_dataset(cfg: DataConfig, seed: int = 0, task: str = "classification", guide_arch: str | None = None,
                 normalization: dict | None = None) -> Dataset:
    """Load, transform, subset and normalise the data set a recipe names (text: see :mod:`theseus_cli.data.text`).

    Images are normalised with the training split's per-channel mean/std, or with ``normalization``
    (``{"mean": [...], "std": [...]}``, e.g. what a converted target recorded) when given, so a model is
    evaluated on inputs scaled as it was trained on. ``cfg.seed``, when set, replaces ``seed`` (the recipe's).
    """
    seed = cfg.seed if cfg.seed is not None else seed
    if get_source(cfg.source).kind == "text":
        return load_text_dataset(cfg, seed, task, guide_arch)
    return load_image_dataset(cfg, seed, normalization)
