"""What a model costs, counted rather than timed: parameters and FLOPs per example (timings: deploy.profile)."""

from __future__ import annotations

import torch
import torch.nn as nn

from theseus_cli.batch import run_model


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _rnn_flops(model: nn.Module) -> tuple[list, dict[str, int]]:
    """Forward hooks that compute the matrix-product FLOPs of every ``nn.RNNBase`` layer run, by module path."""
    counted: dict[str, int] = {}
    gates = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}

    def make_hook(path: str):
        def hook(module: nn.RNNBase, args, _out):
            x = args[0]
            if isinstance(x, nn.utils.rnn.PackedSequence):
                steps = int(x.data.shape[0])  # total real tokens over the batch
            else:
                steps = int(x.shape[0] * x.shape[1]) if x.dim() == 3 else int(x.shape[0])
            g, h = gates.get(module.mode, 1), module.hidden_size
            dirs = 2 if module.bidirectional else 1
            width, flops = module.input_size, 0
            for _layer in range(module.num_layers):
                flops += dirs * steps * 2 * g * h * (width + h)
                width = h * dirs
            counted[path] = counted.get(path, 0) + flops

        return hook

    handles = [m.register_forward_hook(make_hook(p)) for p, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    return handles, counted


def _extra_formulas() -> dict:
    """Ops torch's counter has no formula for: the CPU kernel of scaled-dot-product attention (the counter knows
    only the CUDA ones, so attention's score and value products would count 0 on the CPU)."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: formula}


def count_flops(model: nn.Module, sample) -> int:
    """FLOPs of one forward pass on ``sample`` (one example): torch's flop counter, plus the recurrent layers it
    did not see (on the CPU an RNN runs as matrix products the counter counts; cuDNN's fused kernel it cannot)."""
    return count_flops_by_module(model, sample)[0]


def count_flops_by_module(model: nn.Module, sample) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per module path — a module's count includes its children's) of one forward pass on
    ``sample``; works on meta tensors too (the counter reads shapes only), which is how ``inspect`` prices a
    replacement before building it for real."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    handles, rnn = _rnn_flops(model)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
            run_model(model, sample)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    root = type(model).__name__
    by_module = {path: sum(counts.values()) for path, counts in counter.get_flop_counts().items()}
    per_path = {path[len(root) + 1:]: flops for path, flops in by_module.items() if path.startswith(root + ".")}
    unseen = {path: f for path, f in rnn.items() if not per_path.get(path)}
    for path, f in unseen.items():  # the RNN's own count, and every ancestor's
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            per_path[".".join(parts[:i])] = per_path.get(".".join(parts[:i]), 0) + f
    return int(counter.get_total_flops()) + sum(unseen.values()), per_path
