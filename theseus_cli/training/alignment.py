"""Alignment stages (Algorithm 1 of the paper): train replacements so target activations match the guide's.

One step compares the target's and the guide's activations at a stage's aligned points on a whole
batch with the similarity loss; optionally in micro-batches with the exact full-batch gradient, and,
under ``torchrun``, on activations gathered across ranks (:mod:`theseus_cli.training.distributed`). Loss
values stay on the device and are read back once per epoch, not per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.batch import run_model, token_mask
from theseus_cli.data.dataset import batches_per_epoch, iterate_batches
from theseus_cli.training.distributed import current_dist
from theseus_cli.errors import TrainingError
from theseus_cli.training.faults import (check_stop, diverged, first_nonfinite_module, is_oom, largest_fitting, oom_error,
                                 restore, snapshot)
from theseus_cli.models.hf import model_output
from theseus_cli.models.hooks import first_tensor, forward_until
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.config.recipe import AlignConfig
from theseus_cli.training.fsdp import loss_scale
from theseus_cli.training.runtime import adamw, current_runtime
from theseus_cli.surgery.schedule import Stage
from theseus_cli.similarity import LossFn, sequence_rows
from theseus_cli.training.distill import teacher_term

MAX_TOKEN_ROWS = 4096  # per-token similarity: rows kept per batch (mutual-kNN metrics cost O(rows²) memory)


@dataclass
class AlignJob:
    """How one alignment stage trains: the stage's settings, the similarity loss, batches and where they run."""

    cfg: AlignConfig
    loss_fn: LossFn
    batch_size: int
    generator: torch.Generator
    device: torch.device
    progress: Progress = field(default_factory=NullProgress)
    tokens: str = "flatten"  # how sequence activations become rows (similarity.sequence_rows)
    cache: Any = None  # a training.guide_cache.GuideCache: guide outputs computed once per sample
    objective: str = "similarity"  # or "distill": progressive distillation on the hybrid's output (schedule.objective)
    temperature: float = 4.0  # distill: the softmax temperature
    task: Any = None  # distill: the theseus_cli.tasks.Task whose output distribution is compared
    stage_count: int = 0  # how many stages the schedule has (progress says "stage 3/9"); 0: unknown


@dataclass
class StageResult:
    index: int
    introduced: list[str]
    trained: list[str]
    aligned: list[str]
    feed: str
    steps: int  # gradient steps actually taken
    lr: float = 0.0  # learning rate at the end of the stage (auto stages may have lowered it)
    stopped: str = "epochs"  # epochs (fixed count) | threshold | max_epochs (auto) | nothing to train (identity)
    epochs: int = 0
    losses: list[float] = field(default_factory=list)  # mean Δ over aligned layers, per step
    final_layer_losses: dict[str, float] = field(default_factory=dict)  # Δ per layer, last epoch mean
    seconds: float = 0.0


def _restore_trainable(before: list[tuple[nn.Parameter, bool]], trained: list[nn.Module]) -> None:
    """Each parameter's ``requires_grad`` as it was before the stage; the stage's own modules trainable."""
    for p, flag in before:
        p.requires_grad_(flag)
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)


def set_trainable(model: nn.Module, modules: list[nn.Module]) -> list[nn.Parameter]:
    """Freeze everything in ``model`` except the parameters of ``modules``."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def stage_losses(guide: nn.Module, target: nn.Module, stage: Stage, x, loss_fn: LossFn, tokens: str,
                  cache=None, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Δ per aligned module for one batch (a (len(aligned),) tensor).

    ``stage.aligned`` is in execution order, so both forwards stop right after its last module.
    Sequence activations become rows as ``tokens`` says (:func:`~theseus_cli.similarity.cka.sequence_rows`).
    Under ``torchrun`` this rank runs its shard of ``x`` and the loss is computed on every rank's
    activations gathered (:mod:`theseus_cli.training.distributed`).
    """
    dist = current_dist()
    n = len(x)
    shard = dist.shard(n)  # the whole batch in one process
    xl, il = x[shard], (idx[shard] if idx is not None else None)
    deepest = stage.aligned[-1]
    mask = token_mask(x)
    rows = lambda a: sequence_rows(dist.gather(a, n), tokens, mask, MAX_TOKEN_ROWS)  # noqa: E731
    if stage.feed == "disk":  # blockwise: each aligned block alone, on the guide's input there read from the store
        return stored_block_losses(target, stage, il, cache, loss_fn, rows)
    if stage.feed == "guide":  # independent: each replacement sees the guide's own input there
        with torch.no_grad():
            g_in, g_out = forward_until(guide, xl, stage.aligned, deepest, with_inputs=True)
        return torch.stack([loss_fn(rows(first_tensor(target.get_submodule(p)(g_in[p]))), rows(g_out[p]))
                            for p in stage.aligned])
    g_paths = stage.guide_aligned  # architecture transfer pairs each target block with a guide group's output
    if cache is not None:  # guide outputs computed once per (point, sample) for the whole run
        g_acts = cache.fetch(guide, xl, il, g_paths)
    else:
        with torch.no_grad():
            g_acts = forward_until(guide, xl, g_paths, g_paths[-1])
    t_acts = forward_until(target, xl, stage.aligned, deepest)
    return torch.stack([loss_fn(rows(t_acts[p]), rows(g_acts[q])) for p, q in zip(stage.aligned, g_paths)])


def stored_block_losses(target: nn.Module, stage: Stage, idx: torch.Tensor, store, loss_fn: LossFn, rows) -> torch.Tensor:
    """Δ per aligned block of a ``blockwise`` stage: each block of the target runs alone on the guide's input there,
    called as the guide called it (:class:`~theseus_cli.training.block_store.BlockStore` replays the call), and is
    compared with the guide's stored output. Nothing else of either network runs."""
    device = next(target.parameters()).device
    losses = []
    for point in stage.aligned:
        args, kwargs, guide_out = store.fetch(point, idx, device)
        out = first_tensor(target.get_submodule(point)(*args, **kwargs))
        losses.append(loss_fn(rows(out), rows(guide_out)))
    return torch.stack(losses)


def output_distillation_loss(guide: nn.Module, target: nn.Module, x, task, temperature: float) -> torch.Tensor:
    """Progressive distillation's loss for one batch, as a (1,) tensor: ``T² · KL`` between the guide's and the
    hybrid's output distributions (:func:`theseus_cli.training.distill.teacher_term`; the paper's Appendix I).

    The hybrid runs end to end: the replacements introduced so far, the guide's modules everywhere else. Under
    ``torchrun`` each rank runs its shard and the loss is computed on the outputs gathered from every rank, as the
    similarity objective does with activations.
    """
    dist = current_dist()
    n = len(x)
    xl = x[dist.shard(n)]
    with torch.no_grad():
        g_out = model_output(run_model(guide, xl))
    t_out = model_output(run_model(target, xl))
    return teacher_term(dist.gather(t_out, n), dist.gather(g_out, n), x, task, temperature).reshape(1)


def micro_batched_step(guide: nn.Module, target: nn.Module, stage: Stage, x, job: "AlignJob", micro: int,
                       idx: torch.Tensor | None = None) -> torch.Tensor:
    """Backward of one alignment step on batch ``x`` in slices of ``micro`` samples, with the exact full-batch gradient.

    CKA and D-MNN compare whole batches, so the loss of a batch is not a sum over slices and plain
    gradient accumulation would change the objective. Instead: (1) run every slice without a graph and
    keep only the activations at the aligned points; (2) compute the loss on the whole batch from those
    and back-propagate it to them; (3) re-run each slice with a graph and back-propagate the stored
    gradient slice. Memory: one slice's graph plus the batch's aligned activations. The random state of
    each slice is replayed in (3) so dropout matches (1); BatchNorm layers inside the trained modules see
    slice statistics, as under any micro-batching. Returns the per-point losses (detached).
    """
    if stage.feed == "guide":
        raise TrainingError("align.micro_batch_size does not apply to the independent schedule")
    dist, rt, cache, loss_fn, tokens = current_dist(), current_runtime(job.device), job.cache, job.loss_fn, job.tokens
    n = len(x)
    full_x = x
    own = dist.shard(n)  # this rank's shard (the whole batch in one process), micro-batched; the loss sees every rank's
    x, idx = x[own], (idx[own] if idx is not None else None)
    deepest, g_paths = stage.aligned[-1], stage.guide_aligned
    slices = [slice(i, i + micro) for i in range(0, len(x), micro)]
    states = []
    t_parts, g_parts = [], []
    with torch.no_grad(), rt.autocast():
        for sl in slices:
            states.append(torch.random.get_rng_state() if x.device.type == "cpu" else
                          (torch.random.get_rng_state(), torch.cuda.get_rng_state(x.device)))
            t_parts.append(forward_until(target, x[sl], stage.aligned, deepest))
            g_parts.append(cache.fetch(guide, x[sl], idx[sl], g_paths) if cache is not None
                           else forward_until(guide, x[sl], g_paths, g_paths[-1]))
    t_full = {p: dist.gather(torch.cat([part[p] for part in t_parts]), n).requires_grad_(True) for p in stage.aligned}
    g_full = {q: dist.gather(torch.cat([part[q] for part in g_parts]), n) for q in g_paths}
    mask = token_mask(full_x)
    rows = lambda a: sequence_rows(a, tokens, mask, MAX_TOKEN_ROWS)  # noqa: E731
    losses = torch.stack([loss_fn(rows(t_full[p]), rows(g_full[q])) for p, q in zip(stage.aligned, g_paths)])
    losses.mean().backward()
    grads = {p: t_full[p].grad[own] for p in stage.aligned}
    for sl, state in zip(slices, states):
        if x.device.type == "cpu":
            torch.random.set_rng_state(state)
        else:
            torch.random.set_rng_state(state[0])
            torch.cuda.set_rng_state(state[1], x.device)
        with rt.autocast():
            acts = forward_until(target, x[sl], stage.aligned, deepest)
        torch.autograd.backward([acts[p] for p in stage.aligned], [grads[p][sl] for p in stage.aligned])
    return losses.detach()


def align_stage(index: int, guide: nn.Module, target: nn.Module, stage: Stage, x_train: torch.Tensor,
                job: AlignJob) -> StageResult:
    """One stage: train the modules in ``stage.trained`` so target activations at ``stage.aligned`` match the guide's.

    Both forwards stop right after the last aligned module (``stage.aligned`` is
    in execution order). Guide and target run in eval mode, so every BatchNorm keeps the
    guide's running statistics (the paper's Appendix E.1); only the trained
    modules are in train mode, and only their parameters get gradients.
    """
    return StageTrainer(index, guide, target, stage, job).run(x_train)


class StageTrainer:
    """The loop of one alignment stage, with its optimiser, plateau scheduler, runtime, guide cache and progress bar
    on ``self``. Each epoch starts from a snapshot of the trained modules, put back if the epoch diverges; a stop
    request is honoured after any step (:mod:`theseus_cli.training.faults`)."""

    def __init__(self, index: int, guide: nn.Module, target: nn.Module, stage: Stage, job: AlignJob):
        self.guide, self.target, self.stage, self.job, self.cfg = guide, target, stage, job, job.cfg
        self.rt, self.dist = current_runtime(job.device), current_dist()
        self.trainable = [target.get_submodule(p) for p in stage.trained]
        self.auto = self.cfg.auto if self.cfg.auto.enabled else None
        self.result = StageResult(index, list(stage.introduced), list(stage.trained), list(stage.aligned), stage.feed,
                                  steps=0, lr=self.cfg.lr, stopped="epochs")
        self.where = f"alignment stage {index + 1} ({', '.join(stage.introduced)})"
        self.ema = None  # device tensor of the smoothed loss (auto stages): no host sync per step
        # what each per-step loss entry measures: the aligned points, or the hybrid's output (progressive distillation)
        self.points = ["output"] if job.objective == "distill" else list(stage.aligned)

    def run(self, x_train: torch.Tensor) -> StageResult:
        cfg, auto = self.cfg, self.auto
        self.guide.eval()
        self.target.eval()
        before = [(p, p.requires_grad) for p in self.target.parameters()]  # put back after the stage: a hybrid
        # that shares the guide's frozen tensors (finetune.peft) must leave them frozen
        self.params = set_trainable(self.target, self.trainable)
        if not self.params:  # only weightless replacements (identity: a dropped block) so far: nothing to align
            _restore_trainable(before, self.trainable)
            self.result.stopped = "nothing to train"
            return self.result
        for module in self.trainable:
            module.train()
        self.opt = adamw(self.params, cfg.lr, cfg.weight_decay)
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="min", factor=auto.factor,
                                                                   patience=auto.patience, min_lr=auto.min_lr)
                        if auto else None)
        per_epoch = batches_per_epoch(x_train.shape[0], self.job.batch_size)
        self.per_epoch = min(per_epoch, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else per_epoch
        max_epochs = auto.max_epochs if auto else cfg.epochs
        of = f"/{self.job.stage_count}" if self.job.stage_count else ""
        self.bar = self.job.progress.task(f"stage {self.result.index + 1}{of}: {', '.join(self.stage.introduced)}",
                                          self.per_epoch * max_epochs)
        start = time.perf_counter()
        with self.dist.synced_batchnorm(self.target):
            for _epoch in range(max_epochs):
                if self._epoch(x_train):
                    break
        self.result.lr = self.opt.param_groups[0]["lr"]
        self.opt.zero_grad(set_to_none=True)  # a finished stage's gradients: garbage, held until the next stage
        self.bar.done(line=False)  # the conversion reports the stage, with what is left of the alignment
        self.result.seconds = time.perf_counter() - start
        _restore_trainable(before, self.trainable)
        return self.result

    def step(self, xb, idx, micro: int | None = None) -> torch.Tensor:
        """Forward and backward of one alignment step (gradients accumulate in the trained parameters); the
        per-point losses. ``micro`` overrides ``align.micro_batch_size`` (the out-of-memory probe uses it)."""
        micro = micro or self.cfg.micro_batch_size
        if self.job.objective == "distill":
            with self.rt.autocast():
                loss = output_distillation_loss(self.guide, self.target, xb, self.job.task, self.job.temperature)
            loss.mean().backward()
            return loss
        if micro and micro < len(xb):
            return micro_batched_step(self.guide, self.target, self.stage, xb, self.job, micro, idx)
        with self.rt.autocast():
            layer_losses = stage_losses(self.guide, self.target, self.stage, xb, self.job.loss_fn, self.job.tokens,
                                        self.job.cache, idx)
        (layer_losses.mean() * loss_scale()).backward()
        return layer_losses

    def _guarded_step(self, xb, idx) -> torch.Tensor:
        """:meth:`step`; on running out of memory, the error names the micro-batch size that fits."""
        try:
            return self.step(xb, idx)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self.opt.zero_grad(set_to_none=True)
            fits = largest_fitting(len(xb), lambda m: self.step(xb, idx, micro=m))
            self.opt.zero_grad(set_to_none=True)
            raise oom_error(self.where, xb.device, len(xb), "align.micro_batch_size", fits,
                            "the batch runs in slices of that size with the exact full-batch gradient") from None

    def _epoch(self, x_train: torch.Tensor) -> bool:
        """One epoch (fills ``self.result``); True when an auto stage reached its threshold."""
        saved = snapshot(self.trainable)
        n_points, device = len(self.points), self.job.device
        step_losses, layer_sums = [], torch.zeros(n_points, device=device)  # stays on the device: no per-step sync
        first_bad = torch.full((n_points,), _NEVER, dtype=torch.int64, device=device)  # step each point went bad
        for step, idx in enumerate(iterate_batches(x_train.shape[0], self.job.batch_size, self.job.generator)):
            if step >= self.per_epoch:
                break
            self.opt.zero_grad(set_to_none=True)
            layer_losses = self._guarded_step(self.rt.batch(x_train[idx]), idx).detach()
            self.dist.sum_grads(self.params)  # each rank holds its shard's part of the full-batch gradient
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
            step_losses.append(layer_losses.mean())
            layer_sums += layer_losses
            first_bad = torch.where(~torch.isfinite(layer_losses) & (first_bad == _NEVER), step, first_bad)
            self.result.steps += 1
            self.bar.advance(loss=step_losses[-1])
            if self._smoothed_below_threshold(step_losses[-1]):
                break  # recorded as "threshold" in _finish_epoch
            check_stop(self.where)
        return self._finish_epoch(torch.stack(step_losses).cpu(), layer_sums, first_bad, saved)

    def _smoothed_below_threshold(self, loss: torch.Tensor) -> bool:
        auto = self.auto
        if not auto:
            return False
        alpha = 2.0 / (auto.ema_steps + 1)
        self.ema = loss if self.ema is None else self.ema + alpha * (loss - self.ema)
        return self.result.steps % auto.check_every == 0 and float(self.ema) < auto.stop_loss

    def _finish_epoch(self, epoch_losses: torch.Tensor, layer_sums, first_bad, saved) -> bool:
        result, stage = self.result, self.stage
        if not torch.isfinite(epoch_losses.sum()):
            # where it started: the point that went non-finite first (at a tie, the upstream one, whose output the
            # later points read), else the first trained module with non-finite weights
            first = first_bad.cpu()
            module = self.points[int(first.argmin())] if int(first.min()) != _NEVER and self.points != ["output"] \
                else first_nonfinite_module(self.target, stage.trained)
            restore(self.trainable, saved)
            raise diverged(self.where, "the alignment loss", module, "lower align.lr or set align.grad_clip")
        result.losses.extend(epoch_losses.tolist())
        result.epochs += 1
        result.final_layer_losses = {p: float(v) / len(epoch_losses) for p, v in zip(self.points, layer_sums.cpu())}
        if not self.auto:
            return False
        if float(self.ema) < self.auto.stop_loss:
            result.stopped = "threshold"
            return True
        self.plateau.step(float(self.ema))
        result.stopped = "max_epochs"
        return False


_NEVER = torch.iinfo(torch.int64).max
