"""What a batch of model inputs is: an image tensor, a tensor of token ids, or padded ids with a mask.

Every loop in the tool indexes its inputs (``x[idx]``), moves them (``.to(device)``) and calls the
model through :func:`run_model`, so the same code serves images, language-model sequences and
padded sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Padded token ids with their attention mask (1 = real token), indexed like one tensor."""

    ids: torch.Tensor  # (N, T) int64
    mask: torch.Tensor  # (N, T) int64

    def __getitem__(self, idx) -> "TokenBatch":
        return TokenBatch(self.ids[idx], self.mask[idx])

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def to(self, device, non_blocking: bool = False) -> "TokenBatch":
        return TokenBatch(self.ids.to(device, non_blocking=non_blocking), self.mask.to(device, non_blocking=non_blocking))


def run_model(model, x):
    """Call ``model`` on a batch: a tensor positionally, a :class:`TokenBatch` as ids + attention mask."""
    if isinstance(x, TokenBatch):
        return model(input_ids=x.ids, attention_mask=x.mask)
    return model(x)


def token_mask(x) -> torch.Tensor | None:
    return x.mask if isinstance(x, TokenBatch) else None
