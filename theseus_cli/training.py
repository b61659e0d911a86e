"""Training loops: BatchNorm recalibration, task training, evaluation (alignment stages: theseus_cli.alignment).

All loops draw batches from in-memory tensors with an explicit generator, so a
run with a fixed seed on CPU is reproducible. Loss values are collected as
tensors and read back once per epoch, not per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# alignment stages live in theseus_cli.alignment; re-exported here, where callers have always found them
from theseus_cli.alignment import (MAX_TOKEN_ROWS, StageResult, _stage_losses, align_stage,  # noqa: F401
                                   micro_batched_step, set_trainable)
from theseus_cli.batch import run_model, token_mask
from theseus_cli.data import iterate_batches
from theseus_cli.distributed import current as current_dist
from theseus_cli.faults import (check_stop, diverged, first_nonfinite_module, is_oom, largest_fitting, oom_error,
                                 restore, snapshot)
from theseus_cli.hooks import forward_until
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.runtime import current as current_runtime
from theseus_cli.similarity import all_similarities, sequence_rows
from theseus_cli.tasks import Task


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x_train: torch.Tensor, batches: int, batch_size: int,
                          generator: torch.Generator, device: torch.device) -> int:
    """Re-estimate every BatchNorm's running statistics on training inputs.

    Statistics are reset and accumulated as an exact average (momentum=None)
    over ``batches`` batches; weights are untouched. Returns the number of
    BatchNorm layers recalibrated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    model.eval()
    saved = []
    for bn in norms:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    rt = current_runtime(device)
    for i, idx in enumerate(iterate_batches(x_train.shape[0], batch_size, generator)):
        if i >= batches:
            break
        with rt.autocast():
            run_model(model, rt.batch(x_train[idx]))
    for bn, momentum in zip(norms, saved):
        bn.momentum = momentum
    model.eval()
    return len(norms)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@dataclass
class TaskTrainResult:
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    compile: str = "off"  # off | compiled | fallback to eager: <why>


def train_task(
    model: nn.Module,
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor | None,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    grad_clip: float | None,
    label_smoothing: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    description: str,
    progress: Progress = NullProgress(),
) -> TaskTrainResult:
    """Train every parameter on ``task``'s loss for exactly ``steps`` steps (AdamW, warm-up + cosine)."""
    rt = current_runtime(device)
    dist = current_dist()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup_steps))
    forward = rt.compiled(model)
    result = TaskTrainResult(steps)
    bar = progress.task(description, steps)
    start = time.perf_counter()
    step = 0
    params = list(model.parameters())
    with dist.synced_batchnorm(model):
        while step < steps:
            saved = snapshot([model])  # put back if this epoch diverges
            step, mean = _task_epoch(model, forward, task, x, y, steps, step, label_smoothing, batch_size, generator,
                                     device, grad_clip, opt, sched, params, rt, dist, description, bar)
            if not torch.isfinite(mean):
                module = first_nonfinite_module(model)
                restore([model], saved)
                raise diverged(description, "the task loss", module, "lower the learning rate or set finetune.grad_clip")
            result.epoch_losses.append(float(mean))
    bar.done()
    model.eval()
    result.seconds = time.perf_counter() - start
    result.compile = forward.status
    return result


def _task_step(forward, task, xb, yb, label_smoothing: float, share: float, rt):
    with rt.autocast():
        loss = task.loss(run_model(forward, xb), xb, yb, label_smoothing) * share
    loss.backward()
    return loss


def _task_epoch(model, forward, task, x, y, steps, step, label_smoothing, batch_size, generator, device, grad_clip,
                opt, sched, params, rt, dist, description: str, bar) -> tuple[int, torch.Tensor]:
    """One pass over the data (or until ``steps``) of :func:`train_task`: (the step count reached, the mean loss).

    Under ``torchrun`` each rank trains on its shard of the batch, its mean loss weighted by the shard's
    share, and gradients are summed over ranks: the gradient of the whole batch's mean loss."""
    losses = []
    for idx in iterate_batches(x.shape[0], batch_size, generator):
        if step >= steps:
            break
        share = 1.0
        if dist.enabled:
            whole = len(idx)
            idx = idx[dist.shard(whole)]
            share = len(idx) / whole
        xb = rt.batch(x[idx])
        yb = y[idx].to(device, non_blocking=True) if y is not None else None
        opt.zero_grad(set_to_none=True)
        try:
            loss = _task_step(forward, task, xb, yb, label_smoothing, share, rt)
        except Exception as exc:
            if not is_oom(exc):
                raise
            opt.zero_grad(set_to_none=True)
            fits = largest_fitting(len(xb), lambda b: _task_step(forward, task, xb[:b], None if yb is None else yb[:b],
                                                                 label_smoothing, share, rt))
            opt.zero_grad(set_to_none=True)
            raise oom_error(description, torch.device(device), len(xb), "data.batch_size", fits,
                            "fine-tuning, the baseline and train-guide use it") from None
        dist.sum_grads(params)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        step += 1
        bar.advance()
        check_stop(description)
    return step, dist.all_sum(torch.stack(losses).sum()) / len(losses)  # the shares add up to each batch's mean loss


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, x, y: torch.Tensor | None, batch_size: int, device: torch.device) -> float:
    """``task``'s metric (accuracy, perplexity, cosine to the guide) over all of ``x``; one host sync at the end."""
    rt = current_runtime(device)
    dist = current_dist()
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    part = dist.shard(x.shape[0])  # under torchrun each rank takes a contiguous part; the sums are all-reduced
    offset = part.start or 0
    for idx in iterate_batches(part.stop - offset if dist.enabled else x.shape[0], batch_size, None, drop_last=False):
        idx = idx + offset if dist.enabled else idx
        xb = rt.batch(x[idx])
        with rt.autocast():
            out = run_model(model, xb)
        s, c = task.metric_sums(out, xb, y[idx].to(device) if y is not None else None)
        total += s
        count += c
    sums = dist.all_sum(torch.stack([total, count]))
    return task.finish(float(sums[0]), float(sums[1]))


@torch.no_grad()
def embed(model: nn.Module, x, batch_size: int, device: torch.device) -> torch.Tensor:
    """Sentence embeddings (N, D) of ``x`` on the CPU (see :func:`theseus_cli.tasks.sentence_embedding`)."""
    from theseus_cli.hf_models import model_output
    from theseus_cli.tasks import sentence_embedding

    rt = current_runtime(device)
    model.eval()
    out = []
    for idx in iterate_batches(x.shape[0], batch_size, None, drop_last=False):
        xb = rt.batch(x[idx])
        with rt.autocast():
            hidden = model_output(run_model(model, xb))
        out.append(sentence_embedding(hidden, xb).cpu())
    return torch.cat(out)


@torch.no_grad()
def layer_similarity(guide: nn.Module, target: nn.Module, paths: list[str], x,
                     device: torch.device, k: int = 10, tokens: str = "flatten",
                     guide_paths: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Every similarity metric between guide and target at each path, on inputs ``x``.

    Reported whatever metric was optimised, so a user can find bottleneck layers
    under all of them (the paper's Figure 5 and 8).
    """
    rt = current_runtime(device)
    guide.eval()
    target.eval()
    x = rt.batch(x)
    g_paths = guide_paths or paths  # keyed by the target's path either way
    g = forward_until(guide, x, g_paths, g_paths[-1])
    t = forward_until(target, x, paths, paths[-1])
    mask = token_mask(x)
    return {p: all_similarities(sequence_rows(t[p], tokens, mask, MAX_TOKEN_ROWS),
                                sequence_rows(g[q], tokens, mask, MAX_TOKEN_ROWS), k) for p, q in zip(paths, g_paths)}
