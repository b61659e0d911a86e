"""What every export is checked with: the target as a plain tensor function (``Deployable``), seeded sample inputs
of several shapes, and the element-wise comparison against PyTorch (``check_parity``) that refuses a file before it
is written. Shared by the ONNX/TorchScript exporters (``theseus_cli.deploy.export``) and the transformers-directory
exporter (``theseus_cli.deploy.export_hf``)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.errors import ExportError
from theseus_cli.target_meta import TargetMeta

UNKNOWN_VOCAB = 1000  # token ids drawn below this when a model has no input embedding to read the vocabulary from


class Deployable(nn.Module):
    """The target as a plain tensor function of its inputs: what the task evaluates."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from theseus_cli.models.hf import model_output
        from theseus_cli.tasks import sentence_embedding

        if attention_mask is None and self.task == "causal-lm":
            # the same as no mask for the model; passing it keeps transformers off its packed-sequence detection
            # (torch.diff over positions), which the TorchScript-based ONNX exporter cannot export
            attention_mask = torch.ones_like(x)
        batch = TokenBatch(x, attention_mask) if attention_mask is not None else x
        out = model_output(run_model(self.model, batch))
        if self.task == "sentence-embedding":
            return sentence_embedding(out, batch)
        return out


def sample_inputs(model: nn.Module, meta: TargetMeta, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Seeded inputs of several batch sizes (and sequence lengths): the first is the export example."""
    g = torch.Generator().manual_seed(seed)
    shape = list(meta.input_shape)
    task = meta.task
    if task == "classification" and len(shape) != 1:
        return [(torch.randn(b, *shape, generator=g),) for b in (2, 1, 5)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = emb.num_embeddings if emb is not None else UNKNOWN_VOCAB
    t = shape[0]
    cases = []
    # an odd length too: a capture that froze a length-dependent shape (padding to a multiple) fails there
    for b, length in ((2, t), (1, t), (3, max(2, t // 2)), (2, max(2, t - 3 if t % 2 == 0 else t - 2))):
        ids = torch.randint(0, vocab, (b, length), generator=g)
        if task == "sentence-embedding":
            mask = torch.ones_like(ids)
            if b > 1:
                mask[0, length - max(1, length // 3):] = 0  # right padding on one row
            cases.append((ids, mask))
        else:
            cases.append((ids,))
    return cases


def compare_outputs(expected: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    got = torch.as_tensor(got).to(expected.dtype)
    if got.shape != expected.shape:
        return float("inf"), False
    diff = (got - expected).abs()
    return float(diff.max()) if diff.numel() else 0.0, bool((diff <= atol + rtol * expected.abs()).all())


def check_parity(run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], wrapper: Deployable,
           cases: list[tuple[torch.Tensor, ...]], atol: float, rtol: float, what: str) -> dict[str, Any]:
    worst, checked = 0.0, []
    for inputs in cases:
        with torch.no_grad():
            expected = wrapper(*inputs)
        try:
            with torch.no_grad(), quiet_exporters():
                got = run(inputs)
        except Exception as exc:
            raise ExportError(f"{what} fails on inputs of shape {tuple(inputs[0].shape)}: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        diff, ok = compare_outputs(expected, got, atol, rtol)
        worst = max(worst, diff)
        checked.append(list(inputs[0].shape))
        if not ok:
            raise ExportError(f"{what} differs from PyTorch on inputs of shape {tuple(inputs[0].shape)}: "
                              f"max |Δ| {diff:.3g} > atol {atol:g} + rtol {rtol:g}·|expected| (nothing was written)")
    return {"inputs": checked, "max_abs_diff": worst, "atol": atol, "rtol": rtol, "passed": True}


@contextlib.contextmanager
def quiet_exporters():
    """The exporters print progress, warnings and (from C++, on failure) whole graphs of their own; the CLI owns
    stdout (``--json``) and stderr. Both are redirected at the file-descriptor level while they run."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = []
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        except OSError:  # no real descriptors (embedded use): Python-level redirection only
            pass
        try:
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
