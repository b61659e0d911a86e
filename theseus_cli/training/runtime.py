"""How a run executes on its device: mixed precision, memory format, where the data lives.

``runtime`` in a recipe (all ``auto`` by default) resolves to a :class:`Runtime`
once per run (:func:`resolve_runtime`):

* ``precision`` — ``bf16`` runs forwards under ``torch.autocast(bfloat16)``;
  ``auto`` picks it on CUDA devices that support bfloat16, fp32 elsewhere.
  Similarity reductions always run in float32 (:mod:`theseus_cli.similarity.cka`
  casts), task losses and metrics in float32/float64, and the optimiser keeps
  float32 weights, so only the forwards' matrix products run in bfloat16.
* ``channels_last`` — image models and batches in the channels-last memory
  format (faster convolutions on tensor cores); ``auto``: on CUDA for images.
* ``data_on_device`` — copy the whole data set to the device once, so a batch
  is an index on the device instead of a host-to-device copy per step;
  ``auto``: on CUDA when the tensors take under a quarter of the free memory.
* ``compile`` — ``torch.compile`` the model for fine-tuning, the naive baseline
  and ``train-guide`` (not alignment, whose forward stops early through hooks);
  if compiling or running the compiled model fails, the run goes on eagerly and
  the report says why (``finetune.compile``).

The training loops read the run's runtime from a context variable set by
:func:`using` (``convert`` and ``train-guide`` set it), so library callers that
never set one get plain fp32 on whatever device their tensors are on.
"""

from __future__ import annotations

from contextlib import contextmanager
from theseus_cli.context import changed, run_state
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn

from theseus_cli.batch import TokenBatch
from theseus_cli.errors import DeviceError

DATA_FRACTION_OF_FREE_MEMORY = 0.25
GPU_ALIGN_BATCH = 1024


def align_batch_size(recipe, device: torch.device) -> int:
    """``align.batch_size`` if set; else ``data.batch_size``, raised to at least 1024 on CUDA, where large
    batches are cheap and make CKA/D-MNN estimates less noisy (``align.micro_batch_size`` bounds the memory)."""
    if recipe.align.batch_size is not None:
        return recipe.align.batch_size
    if device.type == "cuda":
        return max(recipe.data.batch_size, GPU_ALIGN_BATCH)
    return recipe.data.batch_size


@dataclass(frozen=True)
class Runtime:
    device: str
    bf16: bool = False
    channels_last: bool = False
    data_on_device: bool = False
    compile: bool = False

    def autocast(self):
        dev = torch.device(self.device)
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16)

    def batch(self, x):
        """``x`` on the device (asynchronously where it can be), image batches in the run's memory format."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def summary(self) -> dict:
        return asdict(self)

    def compiled(self, model: nn.Module):
        """``model``, or with ``compile`` a ``torch.compile`` of it that falls back to ``model`` (eager) if compiling
        or running the compiled graph fails. ``wrapper.status`` says which: off, compiled, or why it fell back."""
        return _Compiled(model, self.compile)


class _Compiled:
    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.fn, self.status = model, model, "off"
        if enabled:
            try:
                self.fn, self.status = torch.compile(model), "compiled"
            except Exception as exc:  # backend missing, unsupported platform
                self.status = f"fallback to eager: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"

    def __call__(self, *args, **kwargs):
        if self.fn is self.model:
            return self.model(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as exc:  # compilation happens at the first call; a real model error re-raises in eager below
            self.fn = self.model
            self.status = f"fallback to eager: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return self.model(*args, **kwargs)


def current_runtime(device: torch.device | str) -> Runtime:
    """The runtime set by :func:`using` (:mod:`theseus_cli.context`), or plain fp32 on ``device``."""
    rt = run_state().runtime
    return rt if rt is not None else Runtime(str(device))


@contextmanager
def using(rt: Runtime) -> Iterator[Runtime]:
    with changed(runtime=rt):
        yield rt


def _nbytes(x) -> int:
    if isinstance(x, TokenBatch):
        return _nbytes(x.ids) + _nbytes(x.mask)
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def resolve_runtime(cfg, device: torch.device, data=None) -> Runtime:
    """Turn the recipe's ``runtime`` (``auto``/``on``/``off`` choices) into decisions for ``device`` and ``data``."""
    cuda = device.type == "cuda"
    if cfg.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"runtime.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    images = data is None or data.kind == "image"
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda and images)
    on_device = cfg.data_on_device == "on"
    if cfg.data_on_device == "auto" and cuda and data is not None:
        free, _ = torch.cuda.mem_get_info(device)
        size = sum(_nbytes(t) for t in (data.x_train, data.y_train, data.x_test, data.y_test))
        on_device = size < DATA_FRACTION_OF_FREE_MEMORY * free
    return Runtime(str(device), bf16, channels_last, on_device and device.type != "cpu", cfg.compile)
