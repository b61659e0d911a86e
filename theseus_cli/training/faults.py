"""Faults a long unattended run must survive: divergence, running out of GPU memory, being told to stop.

* **Divergence.** Loss values stay on the device during an epoch (no per-step host sync), so a
  non-finite loss is seen at the epoch's end. Each epoch starts from a snapshot of the weights it
  trains (not its frozen ones); on a NaN/Inf the snapshot is put back (the model is left as it was before the bad
  epoch; LoRA fine-tuning keeps no snapshot — its trained replacements may be gigabytes — and leaves the model as
  the bad epoch made it) and :class:`~theseus_cli.errors.TrainingError` (exit 9) names the first module that went
  non-finite — the first aligned point with a non-finite loss, or the first module whose weights
  or gradients are not finite.
* **Out of memory** (CUDA): the step that failed is retried on smaller slices of the batch, without
  updating anything, to find what fits; the error (exit 7) names the recipe setting and the value
  that fits (``align.micro_batch_size`` keeps the full-batch gradient exact; for task training,
  ``data.batch_size``).
* **SIGINT / SIGTERM**: the current step finishes, the run stops at that step boundary with its
  resumable checkpoint in place, and the CLI exits 130 / 143 with one line saying how to resume.
  Passes that are not training (evaluation, the guide's sentence embeddings: minutes on a large
  corpus) stop the same way after their current batch. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

from theseus_cli.context import changed, run_state
from theseus_cli.errors import DeviceError, TheseusError, TrainingError


class Interrupted(TheseusError):
    """The run was asked to stop (SIGINT / SIGTERM) and stopped cleanly at a step boundary."""

    exit_code = 130

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------- stop requests

@contextmanager
def graceful_stop() -> Iterator[None]:
    """While active, SIGINT/SIGTERM only set a flag the training loops read after each step
    (:func:`check_stop`); a second signal raises ``KeyboardInterrupt`` at once. Outside the main
    thread (where handlers cannot be installed) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requested: list[int] = []  # the signal numbers received while this block runs (see theseus_cli.context)

    def handler(signum, _frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with changed(stop_signals=requested):
            yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_stop(where: str, unit: str = "step") -> None:
    """Raise :class:`Interrupted` if a stop was requested; called between training steps, and between the batches
    (``unit="batch"``) of passes that are not training (``convert`` adds how to resume)."""
    requested = run_state().stop_signals
    if requested:
        signum = requested[0]
        raise Interrupted(f"stopped by {signal.Signals(signum).name} after a finished {unit} of {where}", signum)


# ---------------------------------------------------------------- divergence


def snapshot(modules: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Copies of what training can change in ``modules`` (on their device): the parameters that require grad and the
    buffers. Frozen parameters are left out: no step changes them, and under LoRA they are a whole guide's weights
    (a copy per epoch would double the memory of a large decoder's fine-tuning)."""
    saved = []
    for m in modules:
        frozen = {name for name, p in m.named_parameters(remove_duplicate=False) if not p.requires_grad}
        saved.append({k: v.detach().clone() for k, v in m.state_dict().items() if k not in frozen})
    return saved


def restore(modules: list[nn.Module], saved: list[dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for m, state in zip(modules, saved):
            own = m.state_dict()
            for k, v in state.items():
                own[k].copy_(v)


def first_nonfinite_module(model: nn.Module, paths: list[str] | None = None) -> str | None:
    """The first module (of ``paths``, else in registration order) with a non-finite weight or gradient."""
    named = [(p, model.get_submodule(p)) for p in paths] if paths is not None else list(model.named_modules())
    for path, module in named:
        for p in module.parameters(recurse=paths is not None):
            if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all()):
                return path or "(root)"
    return None


def diverged(where: str, what: str, module: str | None, advice: str) -> TrainingError:
    at = f"first at module {module!r}" if module else "weights still finite (the loss overflowed)"
    return TrainingError(f"{where}: {what} became non-finite ({at}); the weights were restored to their state before "
                         f"that epoch; {advice}")


# ---------------------------------------------------------------- out of memory


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_fitting(batch: int, try_size: Callable[[int], None]) -> int | None:
    """The largest of batch/2, batch/4, … (≥ 1) for which ``try_size`` does not run out of memory, or None."""
    size = batch // 2
    while size >= 1:
        try:
            try_size(size)
            return size
        except Exception as exc:  # noqa: BLE001 — only out-of-memory is expected here
            if not is_oom(exc):
                raise
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        size //= 2
    return None


def oom_error(where: str, device: torch.device, batch: int, setting: str, fits: int | None, how: str) -> DeviceError:
    free = ""
    if device.type == "cuda":
        f, total = torch.cuda.mem_get_info(device)
        free = f" ({f / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
    if fits is None:
        return DeviceError(f"{where}: out of memory on {device}{free} at a batch of {batch}, and even one sample does "
                           "not fit; use a smaller model or another device")
    return DeviceError(f"{where}: out of memory on {device}{free} at a batch of {batch}; a step on {fits} fits: "
                       f"set {setting}: {fits} ({how})")
