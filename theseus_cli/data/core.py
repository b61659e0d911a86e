"""What every data source gives: a :class:`Dataset` in memory, and the batching all loops share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Dataset:
    """A data set in memory. Images: ``x`` (N, C, H, W) float32 normalised, ``y`` (N,) class ids.
    Tokens (:mod:`theseus_cli.data.text`): ``x`` (N, T) int64 ids or a padded
    :class:`~theseus_cli.batch.TokenBatch`; ``y`` is None (causal LM: the targets are the
    inputs shifted) or, for sentence embeddings, the guide's embeddings filled in by the session."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    num_classes: int | None
    mean: list[float] | None
    std: list[float] | None
    labelled: torch.Tensor  # indices into the training split that carry labels for task training
    kind: str = "image"  # image | tokens
    vocab_size: int | None = None
    tokenizer: str | None = None
    tokens: int | None = None  # tokens in the whole corpus (text only)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        """Move every tensor to ``device`` in place (``runtime.data_on_device``); indices stay on the CPU."""
        for name in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def summary(self) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "train": int(self.x_train.shape[0]),
            "labelled": int(self.labelled.numel()),
            "test": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
        }
        if self.kind == "image":
            out.update(num_classes=self.num_classes, mean=self.mean, std=self.std)
        else:
            out.update(vocab_size=self.vocab_size, tokenizer=self.tokenizer, corpus_tokens=self.tokens)
        return out


def subset(n: int, limit: int | None, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(n, generator=gen)
    return perm if limit is None else perm[: min(limit, n)]




def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``; shuffled when a generator is given.

    With ``drop_last`` a short final batch is dropped (batch statistics and
    similarity indices are noisy on a handful of rows), unless it is the only one.
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    batch_size = min(batch_size, n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, max(stop, batch_size), batch_size):
        yield order[start : start + batch_size]


def sample_batches(x, n: int, batch_size: int, generator: torch.Generator, device) -> Iterator:
    """``n`` of the inputs ``x`` (a tensor or a token batch) drawn without replacement in ``generator``'s order, in
    batches of ``batch_size`` on ``device``: calibration inputs, a fair sample wherever the data is stored in order."""
    order = torch.randperm(len(x), generator=generator)[:n]
    for start in range(0, len(order), batch_size):
        yield x[order[start:start + batch_size]].to(device)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // min(batch_size, n))
