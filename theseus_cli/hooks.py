"""Forward hooks, always removed: activation capture and early exit.

A stage of alignment only needs activations up to the deepest module it
aligns, so :func:`forward_until` stops the forward pass right after that
module runs (by raising a private exception from its hook), which skips the
rest of the network — often most of its cost.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


class _StopForward(Exception):
    pass


def first_tensor(output) -> torch.Tensor:
    """The tensor a module's output stands for (first element of a tuple/list output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor to align")


@contextmanager
def capture(model: nn.Module, paths: list[str], stop_after: str | None = None,
            inputs: dict[str, torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each module in ``paths`` (and its first input, into ``inputs`` when given);
    optionally stop the forward pass after ``stop_after``."""
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(path: str):
        def hook(_module, args, output):
            if inputs is not None:
                inputs[path] = args[0]
            acts[path] = first_tensor(output)
            if path == stop_after:
                raise _StopForward

        return hook

    try:
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_hook(make_hook(path)))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, x: torch.Tensor, paths: list[str], stop_after: str | None,
                  with_inputs: bool = False):
    """Run ``model(x)``, return the outputs at ``paths`` (and, ``with_inputs``, a second dict of
    their inputs), stopping right after ``stop_after`` runs."""
    inputs: dict[str, torch.Tensor] | None = {} if with_inputs else None
    with capture(model, paths, stop_after, inputs) as acts:
        try:
            model(x)
        except _StopForward:
            pass
    missing = [p for p in paths if p not in acts]
    if missing:
        raise RuntimeError(f"modules not reached in the forward pass: {', '.join(missing)}")
    return (inputs, acts) if with_inputs else acts


@contextmanager
def trace_shapes(model: nn.Module) -> Iterator[dict[str, dict]]:
    """Record, for every submodule, call count, input/output shapes and completion order."""
    info: dict[str, dict] = {}
    handles = []
    counter = [0]

    def make_hook(path: str):
        def hook(_module, inputs, output):
            rec = info.setdefault(path, {"calls": 0})
            rec["calls"] += 1
            if rec["calls"] == 1:
                rec["order"] = counter[0]
                counter[0] += 1
                rec["input"] = tuple(inputs[0].shape[1:]) if inputs and isinstance(inputs[0], torch.Tensor) else None
                rec["n_inputs"] = len(inputs)
                try:
                    rec["output"] = tuple(first_tensor(output).shape[1:])
                except TypeError:
                    rec["output"] = None

        return hook

    try:
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_hook(make_hook(path)))
        yield info
    finally:
        for handle in handles:
            handle.remove()
