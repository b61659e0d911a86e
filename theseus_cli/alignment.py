"""Alignment stages (Algorithm 1 of the paper): train replacements so target activations match the guide's.

One step compares the target's and the guide's activations at a stage's aligned points on a whole
batch with the similarity loss; optionally in micro-batches with the exact full-batch gradient, and,
under ``torchrun``, on activations gathered across ranks (:mod:`theseus_cli.distributed`). Loss
values stay on the device and are read back once per epoch, not per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from theseus_cli.batch import token_mask
from theseus_cli.data import batches_per_epoch, iterate_batches
from theseus_cli.distributed import current as current_dist
from theseus_cli.errors import TrainingError
from theseus_cli.faults import (check_stop, diverged, first_nonfinite_module, is_oom, largest_fitting, oom_error,
                                 restore, snapshot)
from theseus_cli.hooks import first_tensor, forward_until
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.recipe import AlignConfig
from theseus_cli.runtime import current as current_runtime
from theseus_cli.schedule import Stage
from theseus_cli.similarity import LossFn, sequence_rows

MAX_TOKEN_ROWS = 4096  # per-token similarity: rows kept per batch (mutual-kNN metrics cost O(rows²) memory)


@dataclass
class StageResult:
    index: int
    introduced: list[str]
    trained: list[str]
    aligned: list[str]
    feed: str
    steps: int  # gradient steps actually taken
    lr: float = 0.0  # learning rate at the end of the stage (auto stages may have lowered it)
    stopped: str = "epochs"  # epochs (fixed count) | threshold | max_epochs (auto)
    epochs: int = 0
    losses: list[float] = field(default_factory=list)  # mean Δ over aligned layers, per step
    final_layer_losses: dict[str, float] = field(default_factory=dict)  # Δ per layer, last epoch mean
    seconds: float = 0.0


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


def _stage_losses(guide: nn.Module, target: nn.Module, stage: Stage, x, loss_fn: LossFn, tokens: str,
                  cache=None, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Δ per aligned module for one batch (a (len(aligned),) tensor).

    ``stage.aligned`` is in execution order, so both forwards stop right after its last module.
    Sequence activations become rows as ``tokens`` says (:func:`~theseus_cli.similarity.sequence_rows`).
    Under ``torchrun`` this rank runs its shard of ``x`` and the loss is computed on every rank's
    activations gathered (:mod:`theseus_cli.distributed`).
    """
    dist = current_dist()
    n = len(x)
    shard = dist.shard(n)  # the whole batch in one process
    xl, il = x[shard], (idx[shard] if idx is not None else None)
    deepest = stage.aligned[-1]
    mask = token_mask(x)
    rows = lambda a: sequence_rows(dist.gather(a, n), tokens, mask, MAX_TOKEN_ROWS)  # noqa: E731
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


def micro_batched_step(guide: nn.Module, target: nn.Module, stage: Stage, x, loss_fn: LossFn, tokens: str,
                       micro: int, rt, cache=None, idx: torch.Tensor | None = None) -> torch.Tensor:
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
    dist = current_dist()
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


def _align_step(guide, target, stage, xb, idx, cfg, loss_fn, tokens, cache, rt, micro: int | None = None) -> torch.Tensor:
    """Forward and backward of one alignment step (gradients accumulate in the trained parameters); the
    per-point losses. ``micro`` overrides ``align.micro_batch_size`` (the out-of-memory probe uses it)."""
    micro = micro or cfg.micro_batch_size
    if micro and micro < len(xb):
        return micro_batched_step(guide, target, stage, xb, loss_fn, tokens, micro, rt, cache, idx)
    with rt.autocast():
        layer_losses = _stage_losses(guide, target, stage, xb, loss_fn, tokens, cache, idx)
    layer_losses.mean().backward()
    return layer_losses


def align_stage(
    index: int,
    guide: nn.Module,
    target: nn.Module,
    stage: Stage,
    x_train: torch.Tensor,
    cfg: AlignConfig,
    loss_fn: LossFn,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    progress: Progress = NullProgress(),
    tokens: str = "flatten",
    cache=None,
) -> StageResult:
    """One stage: train the modules in ``stage.trained`` so target activations at ``stage.aligned`` match the guide's.

    Both forwards stop right after the last aligned module (``stage.aligned`` is
    in execution order). Guide and target run in eval mode, so every BatchNorm keeps the
    guide's running statistics (the paper's Appendix E.1); only the trained
    modules are in train mode, and only their parameters get gradients.
    """
    rt = current_runtime(device)
    dist = current_dist()
    guide.eval()
    target.eval()
    trainable = [target.get_submodule(p) for p in stage.trained]
    params = set_trainable(target, trainable)
    for module in trainable:
        module.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = batches_per_epoch(x_train.shape[0], batch_size)
    if cfg.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    auto = cfg.auto if cfg.auto.enabled else None
    max_epochs = auto.max_epochs if auto else cfg.epochs
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=auto.factor, patience=auto.patience,
                                                          min_lr=auto.min_lr) if auto else None)
    alpha = 2.0 / (auto.ema_steps + 1) if auto else 0.0
    result = StageResult(index, list(stage.introduced), list(stage.trained), list(stage.aligned), stage.feed, steps=0,
                         lr=cfg.lr, stopped="epochs")
    where = f"alignment stage {index + 1} ({', '.join(stage.introduced)})"
    task = progress.task(f"stage {index + 1}: {', '.join(stage.introduced)}", per_epoch * max_epochs)
    start = time.perf_counter()
    with dist.synced_batchnorm(target):
        _align_epochs(guide, target, stage, x_train, cfg, loss_fn, batch_size, generator, device, tokens, cache,
                      rt, dist, opt, params, per_epoch, max_epochs, auto, plateau, alpha, result, where, task, trainable)
    result.lr = opt.param_groups[0]["lr"]
    task.done()
    result.seconds = time.perf_counter() - start
    for p in target.parameters():
        p.requires_grad_(True)
    return result


def _align_epochs(guide, target, stage, x_train, cfg, loss_fn, batch_size, generator, device, tokens, cache, rt, dist,
                  opt, params, per_epoch, max_epochs, auto, plateau, alpha, result: StageResult, where: str, task,
                  trainable: list[nn.Module]) -> None:
    """The epoch loop of :func:`align_stage` (fills ``result``). Each epoch starts from a snapshot of the trained
    modules, put back if the epoch diverges; a stop request is honoured after any step (:mod:`theseus_cli.faults`)."""
    ema = None  # device tensor: no host sync per step
    for _epoch in range(max_epochs):
        saved = snapshot(trainable)
        step_losses, layer_sums = [], torch.zeros(len(stage.aligned), device=device)  # stays on the device: no per-step sync
        never = torch.iinfo(torch.int64).max
        first_bad = torch.full((len(stage.aligned),), never, dtype=torch.int64, device=device)  # step each point went bad
        for step, idx in enumerate(iterate_batches(x_train.shape[0], batch_size, generator)):
            if step >= per_epoch:
                break
            opt.zero_grad(set_to_none=True)
            xb = rt.batch(x_train[idx])
            try:
                layer_losses = _align_step(guide, target, stage, xb, idx, cfg, loss_fn, tokens, cache, rt)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                opt.zero_grad(set_to_none=True)
                fits = largest_fitting(len(xb), lambda m: _align_step(guide, target, stage, xb, idx, cfg, loss_fn, tokens,
                                                                      cache, rt, micro=m))
                opt.zero_grad(set_to_none=True)
                raise oom_error(where, xb.device, len(xb), "align.micro_batch_size", fits,
                                "the batch runs in slices of that size with the exact full-batch gradient") from None
            dist.sum_grads(params)  # each rank holds its shard's part of the full-batch gradient
            loss = layer_losses.detach().mean()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step_losses.append(loss.detach())
            layer_sums += layer_losses.detach()
            first_bad = torch.where(~torch.isfinite(layer_losses.detach()) & (first_bad == never), step, first_bad)
            result.steps += 1
            task.advance()
            if auto:
                ema = loss.detach() if ema is None else ema + alpha * (loss.detach() - ema)
                if result.steps % auto.check_every == 0 and float(ema) < auto.stop_loss:
                    break  # recorded as "threshold" below
            check_stop(where)
        epoch_losses = torch.stack(step_losses).cpu()
        if not torch.isfinite(epoch_losses.sum()):
            # where it started: the point that went non-finite first (at a tie, the upstream one, whose output the
            # later points read), else the first trained module with non-finite weights
            first = first_bad.cpu()
            module = stage.aligned[int(first.argmin())] if int(first.min()) != never else \
                first_nonfinite_module(target, stage.trained)
            restore(trainable, saved)
            raise diverged(where, "the alignment loss", module, "lower align.lr or set align.grad_clip")
        result.losses.extend(epoch_losses.tolist())
        result.epochs += 1
        result.final_layer_losses = {p: float(v) / len(step_losses) for p, v in zip(stage.aligned, layer_sums.cpu())}
        if auto:
            if float(ema) < auto.stop_loss:
                result.stopped = "threshold"
                break
            plateau.step(float(ema))
            result.stopped = "max_epochs"
