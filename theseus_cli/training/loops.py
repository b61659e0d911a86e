"""Training loops: BatchNorm recalibration, task training, evaluation (alignment stages: theseus_cli.training.alignment).

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

from theseus_cli.training.alignment import MAX_TOKEN_ROWS
from theseus_cli.batch import run_model, token_mask
from theseus_cli.data.dataset import batches_per_epoch, iterate_batches
from theseus_cli.training.distributed import current_dist
from theseus_cli.training.faults import (check_stop, diverged, first_nonfinite_module, is_oom, largest_fitting, oom_error,
                                 restore, snapshot)
from theseus_cli.models.hooks import forward_until
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.training.fsdp import loss_scale
from theseus_cli.training.memory import release_freed_memory, trims_each_step
from theseus_cli.training.runtime import adamw, current_runtime
from theseus_cli.similarity import all_similarities, sequence_rows
from theseus_cli.tasks import Task
from theseus_cli.training.distill import Teacher, teacher_term


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


@dataclass
class TaskJob:
    """How :func:`train_task` trains: exactly ``steps`` AdamW steps, linear warm-up then cosine decay."""

    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    label_smoothing: float
    batch_size: int
    generator: torch.Generator
    device: torch.device
    description: str
    progress: Progress = field(default_factory=NullProgress)
    teacher: Teacher | None = None  # a teacher term (theseus_cli.training.distill); None: the task loss alone
    marked_only: bool = False  # train only the parameters that require grad (LoRA: adapters and replacements)


def train_task(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor | None, job: TaskJob) -> TaskTrainResult:
    """Train every parameter (``job.marked_only``: those that require grad) on ``task``'s loss for exactly
    ``job.steps`` steps (AdamW, warm-up + cosine)."""
    return TaskTrainer(model, task, job).run(x, y)


class TaskTrainer:
    """The task-training loop with its optimiser, schedule, runtime and progress bar on ``self``. Each epoch starts
    from a snapshot of the model, put back if the epoch diverges."""

    def __init__(self, model: nn.Module, task: Task, job: TaskJob):
        self.model, self.task, self.job = model, task, job
        self.rt, self.dist = current_runtime(job.device), current_dist()
        self.step = 0
        self.trim = False  # run() decides (trims_each_step)

    def run(self, x: torch.Tensor, y: torch.Tensor | None) -> TaskTrainResult:
        job, model = self.job, self.model
        if not job.marked_only:
            for p in model.parameters():
                p.requires_grad_(True)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw(self.params, job.lr, job.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, job.steps, job.warmup_steps))
        self.forward = self.rt.compiled(model)
        self.trim = trims_each_step(model, torch.device(job.device))
        self.bar = job.progress.task(job.description, job.steps)
        teacher = job.teacher
        self.teacher_batches = teacher.batches(job.batch_size) if teacher and teacher.inputs is not None else None
        result = TaskTrainResult(job.steps)
        start = time.perf_counter()
        with self.dist.synced_batchnorm(model):
            while self.step < job.steps:
                # put back if this epoch diverges; not under LoRA (marked_only), whose trained replacements may be a
                # large decoder's gigabytes: a diverged epoch ends the run all the same, with the same message
                saved = None if job.marked_only else snapshot([model])
                mean = self._epoch(x, y)
                if not torch.isfinite(mean):
                    module = first_nonfinite_module(model)
                    if saved is not None:
                        restore([model], saved)
                    raise diverged(job.description, "the task loss", module,
                                   "lower the learning rate or set finetune.grad_clip")
                result.epoch_losses.append(float(mean))
                self.bar.note(f"epoch {len(result.epoch_losses)}/{self._epochs(x.shape[0])}, mean loss {float(mean):.4g}")
        self.bar.done()
        self.opt.zero_grad(set_to_none=True)  # a finished run's gradients are garbage, as large as what it trained
        model.eval()
        result.seconds = time.perf_counter() - start
        result.compile = self.forward.status
        return result

    def _epochs(self, examples: int) -> int:
        """Passes over the data ``job.steps`` take (the last one may be cut short)."""
        return -(-self.job.steps // batches_per_epoch(examples, self.job.batch_size))

    def _step(self, xb, yb, share: float, teacher_batch=None):
        """Forward and backward of one step: the task loss on ``xb``; with a teacher, mixed with the teacher term
        on ``teacher_batch`` (``(inputs, share)`` drawn from all training inputs) or, without one, on ``xb``.
        Each term is weighted by its shard's share of the whole batch under ``torchrun``."""
        loss = self._loss(xb, yb, share, teacher_batch)
        if self.trim:  # the forward's freed activations, before the backward allocates the gradients
            release_freed_memory()
        (loss * loss_scale()).backward()
        if self.trim:
            release_freed_memory()
        return loss

    def _loss(self, xb, yb, share: float, teacher_batch=None) -> torch.Tensor:
        """The step's loss with its graph (the outputs themselves freed on return: the graph keeps what it needs)."""
        teacher = self.job.teacher
        with self.rt.autocast():
            out = run_model(self.forward, xb)
            loss = self.task.loss(out, xb, yb, self.job.label_smoothing) * share
            if teacher is not None:
                t_in, t_share = (xb, share) if teacher_batch is None else teacher_batch
                s_out = out if teacher_batch is None else run_model(self.forward, t_in)
                term = teacher_term(s_out, teacher.outputs(t_in), t_in, self.task, teacher.temperature) * t_share
                loss = teacher.weight * term + (1.0 - teacher.weight) * loss
        return loss

    def _guarded_step(self, xb, yb, share: float, teacher_batch=None):
        """:meth:`_step`; on running out of memory, the error names the batch size that fits."""
        try:
            return self._step(xb, yb, share, teacher_batch)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self.opt.zero_grad(set_to_none=True)
            tb = teacher_batch
            fits = largest_fitting(len(xb), lambda b: self._step(xb[:b], None if yb is None else yb[:b], share,
                                                                 None if tb is None else (tb[0][:b], tb[1])))
            self.opt.zero_grad(set_to_none=True)
            raise oom_error(self.job.description, torch.device(self.job.device), len(xb), "data.batch_size", fits,
                            "fine-tuning, the baseline and train-guide use it") from None

    def _epoch(self, x, y) -> torch.Tensor:
        """One pass over the data (or until ``job.steps``): the mean loss.

        Under ``torchrun`` each rank trains on its shard of the batch, its mean loss weighted by the shard's
        share, and gradients are summed over ranks: the gradient of the whole batch's mean loss."""
        job, dist = self.job, self.dist
        losses = []
        for idx in iterate_batches(x.shape[0], job.batch_size, job.generator):
            if self.step >= job.steps:
                break
            share = 1.0
            if dist.enabled:
                whole = len(idx)
                idx = idx[dist.shard(whole)]
                share = len(idx) / whole
            xb = self.rt.batch(x[idx])
            yb = y[idx].to(job.device, non_blocking=True) if y is not None else None
            self.opt.zero_grad(set_to_none=True)
            loss = self._guarded_step(xb, yb, share, self._teacher_batch())
            dist.sum_grads(self.params)
            if job.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, job.grad_clip)
            self.opt.step()
            self.sched.step()
            losses.append(loss.detach())
            self.step += 1
            self.bar.advance(loss=loss.detach())
            check_stop(job.description)
        return dist.all_sum(torch.stack(losses).sum()) / len(losses)  # the shares add up to each batch's mean loss

    def _teacher_batch(self):
        """This step's batch of the teacher's own inputs and its share (this rank's shard under torchrun), or None."""
        if self.teacher_batches is None:
            return None
        tidx = next(self.teacher_batches)
        whole, share = len(tidx), 1.0
        if self.dist.enabled:
            tidx = tidx[self.dist.shard(whole)]
            share = len(tidx) / whole
        return self.rt.batch(self.job.teacher.inputs[tidx]), share


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, x, y: torch.Tensor | None, batch_size: int, device: torch.device) -> float:
    """``task``'s metric (accuracy, perplexity, cosine to the guide) over all of ``x``; one host sync at the end."""
    rt = current_runtime(device)
    dist = current_dist()
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    # under torchrun each rank takes a contiguous part and the sums are all-reduced; sharded (runtime.fsdp), every
    # rank runs every batch (each forward gathers blocks from all ranks) and the sums are its own
    split = dist.enabled and not dist.sharded
    part = dist.shard(x.shape[0])
    offset = part.start or 0
    for idx in iterate_batches(part.stop - offset if split else x.shape[0], batch_size, None, drop_last=False):
        idx = idx + offset if split else idx
        xb = rt.batch(x[idx])
        with rt.autocast():
            out = run_model(model, xb)
        s, c = task.metric_sums(out, xb, y[idx].to(device) if y is not None else None)
        total += s
        count += c
        check_stop("evaluation", unit="batch")
    sums = dist.all_sum(torch.stack([total, count])) if split else torch.stack([total, count])
    return task.finish(float(sums[0]), float(sums[1]))


@torch.no_grad()
def embed(model: nn.Module, x, batch_size: int, device: torch.device) -> torch.Tensor:
    """Sentence embeddings (N, D) of ``x`` on the CPU (see :func:`theseus_cli.tasks.sentence_embedding`)."""
    from theseus_cli.models.hf import model_output
    from theseus_cli.tasks import sentence_embedding

    rt = current_runtime(device)
    model.eval()
    out = []
    for idx in iterate_batches(x.shape[0], batch_size, None, drop_last=False):
        xb = rt.batch(x[idx])
        with rt.autocast():
            hidden = model_output(run_model(model, xb))
        out.append(sentence_embedding(hidden, xb).cpu())
        check_stop("the guide's sentence embeddings", unit="batch")
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
    with rt.autocast():  # a target with bfloat16 frozen weights and float32 replacements runs as in training
        g = forward_until(guide, x, g_paths, g_paths[-1])
        t = forward_until(target, x, paths, paths[-1])
    mask = token_mask(x)
    return {p: all_similarities(sequence_rows(t[p], tokens, mask, MAX_TOKEN_ROWS),
                                sequence_rows(g[q], tokens, mask, MAX_TOKEN_ROWS), k) for p, q in zip(paths, g_paths)}
