"""Guide activations cached across epochs and stages (``align.cache_guide``).

The guide is frozen and in eval mode, and the data are fixed tensors (no
augmentation), so the guide's output at an alignment point for a given training
sample never changes. With the cache on, each (point, sample) is computed once —
by the first batch that needs it — and stored on the run's device; later epochs,
and later progressive stages that align the same points, index the store instead
of running the guide. A batch that still lacks some (point, sample) runs the guide
on those samples only, up to the deepest point the stage aligns.

Memory: samples × (features of every cached point), in the activations' dtype
(bfloat16 under ``runtime.precision: bf16``). The cache takes at most half of the
free device memory (CUDA) or a quarter of the machine's RAM (CPU); a point that
would not fit is not cached, the run goes on computing it, and the report says
so. The independent schedule feeds each module the guide's input there, which
is not cached.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from theseus_cli.models.hooks import forward_until

GPU_FRACTION = 0.5
CPU_FRACTION = 0.25


def memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_FRACTION * free)
    try:
        return int(CPU_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


class GuideCache:
    def __init__(self, n_samples: int, device: torch.device, budget: int | None = None):
        self.n = n_samples
        self.device = device
        self.budget = memory_budget(device) if budget is None else budget
        self.store: dict[str, torch.Tensor] = {}
        self.filled: dict[str, torch.Tensor] = {}
        self.refused: dict[str, str] = {}  # point → why it is not cached
        self.guide_forwards = 0
        self.guide_rows = 0  # samples the guide was run on

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def summary(self) -> dict:
        return {"points": sorted(self.store), "bytes": self.bytes, "refused": dict(self.refused),
                "guide_forwards": self.guide_forwards, "guide_rows": self.guide_rows}

    def fetch(self, guide: nn.Module, x, idx: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
        """The guide's outputs at ``paths`` (execution order) for batch ``x`` = samples ``idx``.

        The guide runs only on the rows some point still lacks (the guide is in eval mode, so a
        sample's output does not depend on the rest of its batch)."""
        idx = idx.to(self.device)
        if any(p in self.refused or p not in self.filled for p in paths):
            missing = torch.ones(len(idx), dtype=torch.bool, device=self.device)
        else:
            missing = torch.zeros(len(idx), dtype=torch.bool, device=self.device)
            for p in paths:
                missing |= ~self.filled[p][idx]
        n_missing = int(missing.sum())  # one host sync per batch: the price of knowing what to compute
        if n_missing == 0:
            return {p: self.store[p][idx] for p in paths}
        everything = n_missing == len(idx)
        rows = None if everything else missing.nonzero().squeeze(1)
        with torch.no_grad():
            fresh = forward_until(guide, x if everything else x[rows], paths, paths[-1])
        self.guide_forwards += 1
        self.guide_rows += n_missing
        for p in paths:
            self._keep(p, idx if everything else idx[rows], fresh[p])
        return fresh if everything else {p: self.store[p][idx] for p in paths}

    def _keep(self, path: str, idx: torch.Tensor, acts: torch.Tensor) -> None:
        if path in self.refused:
            return
        if path not in self.store:
            size = self.n * acts[0].numel() * acts.element_size()
            if self.bytes + size > self.budget:
                self.refused[path] = f"needs {size / 2**20:.0f} MiB, over the cache budget of {self.budget / 2**20:.0f} MiB"
                return
            self.store[path] = torch.empty((self.n, *acts.shape[1:]), dtype=acts.dtype, device=self.device)
            self.filled[path] = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.store[path][idx] = acts.to(self.store[path].dtype)
        self.filled[path][idx] = True
