"""Every random stream of a run, derived from the recipe's one ``seed`` in one place.

Each phase draws from its own named stream, so adding draws to one phase (a longer alignment, a baseline
switched on) never changes what another phase sees, and a resumed run replays the same streams as an
uninterrupted one. The offsets are part of the reproducibility contract — changing one changes every figure
a recipe gives for its seed — so they live only here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_OFFSETS = {
    "data": 0,  # subsets, splits, random canvas placement (load_dataset)
    "guide_init": 0,  # an untrained or config-built guide's weights
    "align": 1,  # the order of alignment batches, all stages
    "recalibrate": 2,  # BatchNorm recalibration batches (convert, transport)
    "finetune": 3,  # end-to-end fine-tuning: batch order and dropout
    "baseline": 4,  # every baseline's task training (labelled batches)
    "distill_teacher": 5,  # the distill baseline's teacher batches over all training inputs
    "finetune_teacher": 6,  # fine-tuning's teacher batches (finetune.distill with inputs: all)
    "baseline_init": 7,  # the baselines' fresh weights (scratch and distill start from the same ones)
    "calibration": 8,  # which training inputs estimate a replaced module's input statistics (init: activation_svd)
    "train_guide": 11,  # train-guide's batch order
    "transport_split": 11,  # transport's calibration / validation split
    "target_init": 1000,  # an architecture-transfer target's initial weights
}
_STAGE_BASE = 1000  # stage i re-seeds the global generator with seed + 1000 + i before its replacements are built


@dataclass(frozen=True)
class Seeds:
    """``Seeds(recipe.seed).align`` is an int; ``.generator("align")`` a fresh ``torch.Generator`` on it."""

    root: int

    def __getattr__(self, name: str) -> int:
        if name.startswith("__") or name not in _OFFSETS:
            raise AttributeError(f"no seed stream {name!r} (streams: {', '.join(_OFFSETS)})")
        return self.root + _OFFSETS[name]

    def stage(self, index: int) -> int:
        """The seed stage ``index`` (0-based) sets before building its replacements (same on a resumed run)."""
        return self.root + _STAGE_BASE + index

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(getattr(self, name))


STREAMS = tuple(_OFFSETS)
