"""Will it fit? Memory checks made before any work, so an absurd size is one line, not an allocator crash.

Two checks, both lower bounds (they refuse only what cannot fit, never what might):

* a model to be trained: its parameters in float32 four times over (weights, gradients and AdamW's two
  moments), against the device's available memory — a ``rank: 1000000000`` replacement is refused
  at plan time, saying how much it needs and what the device has;
* a batch: the batch's inputs plus the largest single activation one forward makes, per example,
  times the batch size (measured with hooks on one example).

Available memory is ``MemAvailable`` of ``/proc/meminfo`` on the CPU (the OS's own estimate of what can
be allocated without swapping) and ``torch.cuda.mem_get_info`` on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.errors import DeviceError

TRAINING_COPIES = 4  # float32 weights, gradients, AdamW exp_avg and exp_avg_sq


def available_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device``; None where it cannot be known."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 1024**3:,.1f} GiB" if n >= 1024**3 / 10 else f"{n / 1024**2:,.1f} MiB"


def require(needed: int, device: torch.device, what: str) -> None:
    """:class:`DeviceError` (exit 7) unless ``needed`` bytes are available on ``device``."""
    have = available_bytes(device)
    if have is not None and needed > have:
        raise DeviceError(f"{what} needs at least {gib(needed)}; {device} has {gib(have)} available")


def require_trainable(params: int, device: torch.device, what: str) -> None:
    require(params * 4 * TRAINING_COPIES, device, f"{what}: {params:,} parameters; training them (float32 weights, "
                                                   "gradients and AdamW's two moments)")


def largest_activation_bytes(model: nn.Module, sample: Any) -> int:
    """Bytes of the largest tensor any module outputs in one forward of ``sample`` (one example)."""
    largest = 0

    def hook(_module, _args, out):
        nonlocal largest
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            run_model(model, sample)
    finally:
        for h in handles:
            h.remove()
    return largest


def require_batches(model: nn.Module, example: Any, sizes: dict[str, int], device: torch.device) -> None:
    """Each ``{setting: batch size}`` fits: a forward on a batch holds at least its inputs and, per example, the
    largest activation the model makes (measured on ``example``, one input on ``device``)."""
    tensors = [example.ids, example.mask] if isinstance(example, TokenBatch) else [example]
    per_example = sum(t.numel() * t.element_size() for t in tensors) + largest_activation_bytes(model, example)
    for setting, size in sizes.items():
        require(size * per_example, device, f"{setting}: a forward on a batch of {size:,} (its inputs and the "
                                            "largest activation)")
