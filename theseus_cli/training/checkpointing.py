"""Activation checkpointing in fine-tuning (``finetune.checkpointing: true``): a block's activations are not kept for
the backward pass but recomputed there, trading one more forward for memory that no longer grows with depth.

Which modules: the **blocks**, i.e. every element of an ``nn.Sequential`` or ``nn.ModuleList`` that has parameters
and submodules of its own and is not itself such a container (a ResNet's ``layer2.1``, a transformer's ``h.3``),
outermost only. A network with no
such block (a flat stack of layers) is refused naming the field: there would be nothing to checkpoint.

How: each block's ``forward`` is wrapped, while fine-tuning runs, in :func:`torch.utils.checkpoint.checkpoint`
(``use_reentrant=False``, the RNG state preserved so dropout draws the same masks when recomputed). One catch is
handled: a recomputed forward in training mode would update BatchNorm's running statistics a second time, so the
recomputation runs with every BatchNorm's momentum at zero and its batch counter put back (``context_fn``). The
trained weights are then the ones plain fine-tuning gives, to float rounding (a test checks it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from theseus_cli.errors import RecipeError


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost blocks of ``model`` (see the module docstring), as (path, module)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                continue  # a container of blocks (a ResNet stage): its elements are the blocks
            if any(True for _ in child.children()) and any(True for _ in child.parameters()):
                if not any(child_path.startswith(p + ".") for p, _ in found):
                    found.append((child_path, child))
    return found


def checked_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """:func:`blocks`, or a :class:`RecipeError` naming the field when there are none."""
    found = blocks(model)
    if not found:
        raise RecipeError("finetune.checkpointing: the target has no blocks to checkpoint (elements of an "
                          "nn.Sequential or nn.ModuleList with layers of their own); turn it off for this network")
    return found


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` leave their running statistics and batch counter as they were."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _checkpointed(module: nn.Module, forward):
    def contexts():
        return contextlib.nullcontext(), _frozen_batchnorm_stats(module)

    def run(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[int]:
    """While inside, ``model``'s blocks recompute their activations in the backward pass; yields how many blocks."""
    if not enabled:
        yield 0
        return
    found = checked_blocks(model)
    for _, module in found:
        module.forward = _checkpointed(module, module.forward)
    try:
        yield len(found)
    finally:
        for _, module in found:
            del module.forward  # the instance attribute goes; the class's forward is back
