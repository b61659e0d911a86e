"""What a model is trained and judged on: one object per recipe ``task``.

Fine-tuning, the naive baseline and ``train-guide`` all call
:meth:`Task.loss`; evaluation sums :meth:`Task.metric_sums` over held-out
batches and turns the sums into one number with :meth:`Task.finish`:

* ``classification`` — cross-entropy; accuracy.
* ``causal-lm`` — next-token cross-entropy (position t predicts token t+1,
  padding ignored); perplexity = exp(mean NLL over every predicted held-out
  token), summed in float64 so the mean does not depend on batch size.
* ``sentence-embedding`` — the sentence embedding is the attention-masked
  mean of the encoder's last hidden states, L2-normalised (what
  all-MiniLM-L6-v2 and sentence-transformers do); with no labels in the data,
  the task is to reproduce the guide's embeddings: loss 1 − cosine to the
  guide's embedding, metric the mean cosine similarity to it (the guide
  scores 1.0 by definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from theseus_cli.models.hf import model_output
from theseus_cli.batch import token_mask


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    higher_is_better: bool

    def loss(self, output, x, y, label_smoothing: float = 0.0) -> torch.Tensor:
        out = model_output(output)
        if self.name == "classification":
            return F.cross_entropy(out, y, label_smoothing=label_smoothing)
        if self.name == "causal-lm":
            logits, targets = shifted(out, x)
            return next_token_loss(logits, targets)
        return (1.0 - F.cosine_similarity(sentence_embedding(out, x), y, dim=-1)).mean()

    def metric_sums(self, output, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) of the metric's per-item terms for one batch, as device tensors."""
        out = model_output(output)
        if self.name == "classification":
            return (out.argmax(1) == y).sum().double(), torch.tensor(y.shape[0], device=out.device, dtype=torch.float64)
        if self.name == "causal-lm":
            logits, targets = shifted(out, x)
            rows = piece_rows(logits)
            nll = sum(F.cross_entropy(logits[lo:lo + rows].double(), targets[lo:lo + rows], ignore_index=-100,
                                      reduction="sum") for lo in range(0, logits.shape[0], rows))
            return nll, (targets != -100).sum().double()
        cos = F.cosine_similarity(sentence_embedding(out, x).double(), y.double(), dim=-1)
        return cos.sum(), torch.tensor(cos.shape[0], device=cos.device, dtype=torch.float64)

    def finish(self, total: float, count: float) -> float:
        if count == 0:
            return float("nan")
        if self.name == "causal-lm":
            return math.exp(total / count)
        return total / count


TASKS = {
    "classification": Task("classification", "accuracy", True),
    "causal-lm": Task("causal-lm", "perplexity", False),
    "sentence-embedding": Task("sentence-embedding", "cosine_to_guide", True),
}


def get_task(name: str) -> Task:
    return TASKS[name]


def shifted(logits: torch.Tensor, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..T-2 (flattened) and the tokens 1..T-1 they predict (padding → -100)."""
    ids = x.ids if hasattr(x, "ids") else x
    targets = ids[:, 1:].clone()
    mask = token_mask(x)
    if mask is not None:
        targets[mask[:, 1:] == 0] = -100
    return logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)


PIECE_ELEMENTS = 2**24  # logits per piece of the vocabulary-wide loss: 64 MiB in float32


def piece_rows(logits: torch.Tensor) -> int:
    """Rows of (N, V) ``logits`` per piece, so that one piece stays near :data:`PIECE_ELEMENTS` elements."""
    return max(1, PIECE_ELEMENTS // max(1, logits.shape[-1]))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,), -100 ignored, computed in float32.

    A language model's logits are wide (50,257 or 128,256 columns): the plain form holds a float32 copy of all of
    them, its log-softmax for backward and a float32 gradient — four times the bf16 logits, gigabytes at a long
    context. Where the logits are more than one piece (:data:`PIECE_ELEMENTS`), :class:`PiecewiseCrossEntropy` takes
    them ``rows`` at a time instead; where they fit one piece, this is ``F.cross_entropy`` as it always was."""
    rows = rows or piece_rows(logits)
    if rows >= logits.shape[0]:
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)
    return PiecewiseCrossEntropy.apply(logits, targets, rows)


class PiecewiseCrossEntropy(torch.autograd.Function):
    """:func:`next_token_loss` a piece of rows at a time: each piece's log-softmax in float32, its loss summed, and
    its gradient — (softmax − one-hot) / count, zero on ignored rows — written, in the logits' own dtype, into the
    one gradient tensor backward returns (scaled by the incoming gradient). Peak memory is the logits, their
    gradient and one float32 piece, whatever the vocabulary and context; the result equals the plain form's to
    float32 rounding (the sum is taken piece by piece). Not twice differentiable."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        kept = targets != -100
        count = kept.sum()
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for lo in range(0, logits.shape[0], rows):
                logp = torch.log_softmax(logits[lo:lo + rows].float(), dim=-1)
                picked = targets[lo:lo + rows].clamp_min(0).unsqueeze(1)
                keep = kept[lo:lo + rows]
                total -= (logp.gather(1, picked).squeeze(1) * keep).sum()
                if grad is not None:
                    piece = logp.exp_()  # the softmax, in place of the log-softmax
                    piece.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=piece.dtype))
                    grad[lo:lo + rows] = piece.mul_((keep / count).unsqueeze(1))
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def sentence_embedding(hidden: torch.Tensor, x) -> torch.Tensor:
    """Masked mean of ``hidden`` (B, T, D) over real tokens, L2-normalised → (B, D), float32."""
    mask = token_mask(x)
    hidden = hidden.float()
    if mask is None:
        pooled = hidden.mean(1)
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)

