"""Forward hooks, always removed: activation capture and early exit.

A stage of alignment only needs activations up to the deepest module it
aligns, so :func:`forward_until` stops the forward pass right after that
module runs (by raising a private exception from its hook), which skips the
rest of the network — often most of its cost.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from theseus_cli.batch import run_model, token_mask
from theseus_cli.context import run_state
from theseus_cli.shapes import OTHER_OUTPUT, ShapeRecord


class _StopForward(Exception):
    pass


def first_tensor(output) -> torch.Tensor:
    """The tensor a module's output stands for: the first item of a tuple/list, or of a transformers
    ``ModelOutput`` (its first field that is set, e.g. ``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor to align")


def primary_input(args: tuple, kwargs: dict):
    """The tensor a module call transforms: its first positional tensor, else ``hidden_states=``
    (how transformers passes it to attention modules), else the first tensor keyword argument."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


@contextmanager
def capture(model: nn.Module, paths: list[str], stop_after: str | None = None,
            inputs: dict[str, torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each module in ``paths`` (and its first input, into ``inputs`` when given);
    optionally stop the forward pass after ``stop_after``."""
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(path: str):
        def hook(_module, args, kwargs, output):
            if inputs is not None:
                inputs[path] = primary_input(args, kwargs)
            acts[path] = first_tensor(output)
            if path == stop_after:
                raise _StopForward

        return hook

    try:
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_hook(make_hook(path), with_kwargs=True))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, x, paths: list[str], stop_after: str | None,
                  with_inputs: bool = False):
    """Run ``model`` on ``x`` (a tensor or a token batch), return the outputs at ``paths`` (and, ``with_inputs``, a second dict of
    their inputs), stopping right after ``stop_after`` runs."""
    inputs: dict[str, torch.Tensor] | None = {} if with_inputs else None
    if getattr(run_state().dist, "sharded", False):  # runtime.fsdp: every rank takes part in every block's gather
        stop_after = None
    with capture(model, paths, stop_after, inputs) as acts:
        try:
            run_model(model, x)
        except _StopForward:
            pass
    missing = [p for p in paths if p not in acts]
    if missing:
        raise RuntimeError(f"modules not reached in the forward pass: {', '.join(missing)}")
    return (inputs, acts) if with_inputs else acts


@contextmanager
def trace_shapes(model: nn.Module) -> Iterator[dict[str, ShapeRecord]]:
    """Record, for every submodule: call count, completion order, the primary input's and the output's
    per-sample shapes, how many tensors go in (positional or keyword), and the output's structure
    (``output_arity``: None for a bare tensor, else the length of the tuple it returns)."""
    info: dict[str, ShapeRecord] = {}
    handles = []
    counter = [0]

    def make_hook(path: str):
        def hook(_module, args, kwargs, output):
            rec = info.setdefault(path, ShapeRecord())
            rec.calls += 1
            if rec.calls == 1:
                rec.order = counter[0]
                counter[0] += 1
                primary = primary_input(args, kwargs)
                rec.input = tuple(primary.shape[1:]) if primary is not None else None
                rec.n_inputs = len(args) + sum(1 for v in kwargs.values() if v is not None)
                rec.output_arity = None if isinstance(output, torch.Tensor) else (
                    len(output) if isinstance(output, (tuple, list)) else OTHER_OUTPUT)
                try:
                    rec.output = tuple(first_tensor(output).shape[1:])
                except TypeError:
                    rec.output = None

        return hook

    try:
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_hook(make_hook(path), with_kwargs=True))
        yield info
    finally:
        for handle in handles:
            handle.remove()


def input_moments(model: nn.Module, paths: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """The second moment ``E[x xᵀ]`` (in × in, float64 on the CPU) of the features each module in ``paths`` receives,
    over ``batches`` run through ``model`` in eval mode without gradients. A row is one position of the input's last
    axis; for a token batch only real tokens count (padding would pull the moment toward what the mask hides)."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            mask = token_mask(x)
            with torch.no_grad(), capture(model, paths, inputs=(seen := {})):
                run_model(model, x)
            for path, inp in seen.items():
                feats = inp[mask.bool()] if mask is not None and inp.shape[:2] == mask.shape else inp.reshape(-1, inp.shape[-1])
                feats = feats.detach().to("cpu", torch.float64)
                sums[path] = sums.get(path, 0) + feats.T @ feats
                rows[path] = rows.get(path, 0) + feats.shape[0]
    finally:
        model.train(was_training)
    return {path: sums[path] / max(rows[path], 1) for path in sums}
