"""Will it fit? Memory checks made before any work, so an absurd size is one line, not an allocator crash.

Two checks, both lower bounds (they refuse only what cannot fit, never what might):

* a model to be trained: its parameters in float32 four times over (weights, gradients and AdamW's two
  moments), against the device's available memory — a ``rank: 1000000000`` replacement is refused
  at plan time, saying how much it needs and what the device has;
* a batch: the batch's inputs plus the largest single activation one forward makes, per example,
  times the batch size (measured with hooks on one example).

Available memory on the CPU is the least of ``MemAvailable`` of ``/proc/meminfo`` (the OS's own estimate of what can
be allocated without swapping), a container's cgroup limit less its usage, and ``ulimit -v`` less this process's
virtual size; on CUDA, ``torch.cuda.mem_get_info``. The same figure guards reading a checkpoint
(:func:`theseus_cli.models.build.read_state_dict`): a small zip can inflate to more than that.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.errors import DeviceError
from theseus_cli.resources import available_bytes, gib, is_allocation_failure  # noqa: F401  (public here too)

TRAINING_COPIES = 4  # float32 weights, gradients, AdamW exp_avg and exp_avg_sq


def require(needed: int, device: torch.device, what: str) -> None:
    """:class:`DeviceError` (exit 7) unless ``needed`` bytes are available on ``device``."""
    have = available_bytes(device)
    if have is not None and needed > have:
        raise DeviceError(f"{what} needs at least {gib(needed)}; {device} has {gib(have)} available")


def require_trainable(params: int, device: torch.device, what: str, frozen: int = 0) -> None:
    """``params`` trained in float32 (weights, gradients, AdamW's two moments) beside ``frozen`` float32 weights
    that are never trained (LoRA's kept modules)."""
    held = f", beside {frozen:,} frozen" if frozen else ""
    require(params * 4 * TRAINING_COPIES + frozen * 4, device,
            f"{what}: {params:,} parameters trained{held}; training them (float32 weights, gradients and AdamW's "
            "two moments)")


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



def release_freed_memory() -> bool:
    """Hand the heap memory that freed tensors left behind back to the OS (glibc's ``malloc_trim``), between phases
    and, for a large model on the CPU, between the parts of each training step (:func:`trims_each_step`).

    glibc raises its mmap threshold as large blocks are freed, so after a phase's (or a forward's) activations, a few
    MB each, are freed they stay in the heap, resident; the next allocations do not always fit into those holes, and
    the peak grows by what was left. Trimming gives the free pages back (they are faulted in again when reused). A
    no-op (False) where the C library has no ``malloc_trim`` (musl, macOS, Windows)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess), or None."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


TRIM_EACH_STEP_BYTES = 2**30  # a model's weights from which task training trims the heap within each step


def trims_each_step(model: nn.Module, device: torch.device) -> bool:
    """Whether task training on ``device`` hands freed heap memory back after each forward and each backward: on
    the CPU, for a model of at least :data:`TRIM_EACH_STEP_BYTES` of weights. On the 1.17B decoder's LoRA fine-tuning
    this lowered the peak by 0.48 GiB at no measurable cost per step (13.5 s either way; docs/BENCHMARKS.md "Large
    decoders"); for a small model there is nothing to gain and the trims would be a cost per step."""
    if device.type != "cpu" or _malloc_trim() is None:
        return False
    return sum(p.numel() * p.element_size() for p in model.parameters()) >= TRIM_EACH_STEP_BYTES
