"""Data-parallel conversion under ``torchrun`` (``torch.distributed``: NCCL on CUDA, gloo on CPU).

``torchrun --nproc-per-node N -m theseus_cli convert ...`` starts N processes; each builds the
same models from the same seeds and draws the same global batch (same generator), then
works on its own contiguous shard of it. The aim is the result of one process with the
same global batch, not N independent runs:

* **Alignment.** CKA and D-MNN compare whole batches, so a loss computed per shard would be
  a different objective. Each rank gathers every rank's activations at the aligned points
  (:meth:`Dist.gather`; its own slot keeps its autograd graph, the others arrive as
  constants) and computes the full-batch loss, identical on every rank. Back-propagation
  then gives each rank exactly its shard's part of the full-batch gradient, and one flat
  all-reduce (sum) per step (:meth:`Dist.sum_grads`) gives every rank the whole gradient.
* **Task training** (fine-tuning, baseline): per-example losses, so each rank's mean is
  weighted by its share of the batch and the gradients are summed, which is the gradient of
  the global batch mean also when shards differ in size.
* **BatchNorm in training mode** normalises with the statistics of the global batch:
  per-channel sums and sums of squares are all-reduced (differentiably), as
  ``SyncBatchNorm`` does on GPUs (and, unlike it, also on CPU with gloo).
* **Evaluation** splits the test set across ranks and all-reduces the metric's sums.
  BatchNorm recalibration, similarity reports and the guide's embeddings run whole on every
  rank (cheap, and identical by construction).
* Rank 0 alone writes files and prints; the others return ``None`` from the library call.

Random streams are per process, so dropout masks differ from one process's; with dropout
a run is equivalent in distribution, not bit for bit. Sums are reduced in another order
than in one process, so results agree to float tolerance.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from theseus_cli.context import changed, run_state
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from theseus_cli.errors import DeviceError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    sharded: bool = False  # runtime.fsdp: guide and target sharded by block (theseus_cli.training.fsdp)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sizes(self, n: int) -> list[int]:
        """Shard sizes of a batch of ``n``: contiguous, the first ``n % world`` ranks one larger."""
        return [n // self.world + (1 if r < n % self.world else 0) for r in range(self.world)]

    def shard(self, n: int) -> slice:
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Rows of all ranks' ``local`` tensors (shards of a batch of ``n``), in rank order. This rank's rows are
        ``local`` itself, so gradients reach its graph; the other rows are constants."""
        if not self.enabled:
            return local
        import torch.distributed as dist

        sizes = self.sizes(n)
        width = max(sizes)
        padded = local.detach()
        if padded.shape[0] < width:
            padded = torch.cat([padded, padded.new_zeros(width - padded.shape[0], *padded.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        parts = [p[:s] for p, s in zip(parts, sizes)]
        parts[self.rank] = local
        return torch.cat(parts)

    def sum_grads(self, params: list[nn.Parameter], scale: float = 1.0) -> None:
        """Sum every parameter's gradient over ranks (missing gradients count as zero), times ``scale``."""
        if not self.enabled:
            return
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        if self.sharded:  # FSDP's reduce-scatter has combined them (theseus_cli.training.fsdp.loss_scale)
            return
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def synced_batchnorm(self, model: nn.Module) -> Iterator[None]:
        """While active, BatchNorm layers in training mode use the global batch's statistics."""
        if not self.enabled:
            yield
            return
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in norms:
            bn.forward = types.MethodType(_global_batchnorm_forward, bn)
        try:
            yield
        finally:
            for bn in norms:
                del bn.forward


class _AllSum(torch.autograd.Function):
    """Sum over ranks, differentiable: every rank's loss depends on the sum, so the gradient of the
    sum of the ranks' losses with respect to one rank's input is the sum of their gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_batchnorm_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (self.training or self.running_mean is None):
        return type(self).forward(self, x)
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
    stats = _AllSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))  # differentiable sum over ranks
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
            unbiased = var * (n / (n - 1).clamp_min(1))
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
    return y.to(x.dtype)


_SINGLE = Dist()


def current_dist() -> Dist:
    """This process's place in the torchrun job (:mod:`theseus_cli.context`); a one-process Dist outside one."""
    return run_state().dist or _SINGLE


def launched() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: str) -> Iterator[tuple[Dist, str]]:
    """Join the ``torchrun`` job if there is one: (this rank's :class:`Dist`, the device it should use).

    CUDA ranks take ``cuda:LOCAL_RANK`` and talk over NCCL; CPU ranks use gloo. Without torchrun
    this is a no-op yielding a one-process ``Dist``.
    """
    if not launched():
        yield Dist(), device
        return
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local >= torch.cuda.device_count():
            raise DeviceError(f"torchrun: local rank {local} but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size())
    try:
        with changed(dist=d):
            yield d, device
        if owned:  # every rank done before any tears the group down: a rank torn down mid-call aborted at exit
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()
