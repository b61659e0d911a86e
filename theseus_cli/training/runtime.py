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
from dataclasses import asdict, dataclass, replace
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
    cast_cache: bool = True  # autocast keeps each float32 weight's bf16 copy for the whole forward

    def autocast(self):
        """bf16 autocast where the run is bf16. ``cast_cache`` off (bf16 frozen weights,
        :func:`frozen_weights_dtype`): the float32 replacements are cast where they are used instead of their bf16
        copies being held for the whole forward — half their size again in memory, for a recast per use."""
        dev = torch.device(self.device)
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=self.cast_cache)

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


FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where every parameter is a float tensor on a CPU or CUDA device: one kernel per step, with no
    temporaries as large as the parameters (the multi-tensor form allocates them; measured on the CPU, 1.4× the
    trained parameters' size on top of their state, gigabytes for a large decoder's replacements) and faster."""
    from theseus_cli.training.fsdp import is_sharded

    params = list(params)
    kinds = {p.device.type for p in params}
    fused = (len(kinds) == 1 and kinds <= set(FUSED_DEVICES) and all(p.is_floating_point() for p in params)
             and not any(is_sharded(p) for p in params))  # sharded (runtime.fsdp): the multi-tensor form
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


def frozen_weights_dtype(recipe) -> torch.dtype | None:
    """The dtype the guide's weights are built and held in for a conversion: bfloat16 where they stay frozen from
    start to finish — a replace recipe from the guide's weights with ``finetune.peft`` (LoRA adapts them without
    changing them until the merge) — and the run is ``runtime.precision: bf16``; else None (float32, the default).

    Every forward already runs under bf16 autocast then, so holding the frozen weights in bf16 changes no product's
    precision; it halves their memory. The replacements, LoRA adapters and optimiser state stay float32. The model is
    built under that default dtype (its random initialisation, where there is no checkpoint, is drawn in bf16), and the
    target is written in bf16 (its replacements cast once training is over); ``load_target`` reads it into float32.
    ``auto`` precision is not enough: the decision is the recipe's, whatever device runs it. Text tasks only: their
    guides take token ids, so every module after the embedding sees bf16 activations; an image guide would be fed
    float32 pixels by checks and plans that run outside autocast, and stays float32."""
    if (recipe.runtime.precision == "bf16" and recipe.finetune.peft is not None and recipe.target is None
            and recipe.start == "guide" and recipe.task != "classification"):
        return torch.bfloat16
    return None


@contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Build models with ``dtype`` as torch's default floating dtype (None: leave it)."""
    if dtype is None:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def conversion_runtime(recipe, device: torch.device, data=None) -> Runtime:
    """:func:`resolve_runtime` for a conversion of ``recipe``: under bf16 frozen weights (:func:`frozen_weights_dtype`)
    without autocast's weight cache, so the float32 replacements are cast where used instead of held twice."""
    rt = resolve_runtime(recipe.runtime, device, data)
    if frozen_weights_dtype(recipe) is not None:
        rt = replace(rt, cast_cache=False)
    return rt


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
