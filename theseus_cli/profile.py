"""What a model costs to deploy: parameters, FLOPs per example, measured latency.

Used by ``theseus eval``, by ``convert``'s report (guide vs target) and by the
``--max-latency-ms`` gate. FLOPs are counted by ``torch.utils.flop_counter`` on one
example (a multiply-add is 2 FLOPs). Recurrent layers that the counter does not see (cuDNN
runs an RNN as one fused kernel; on the CPU it decomposes into matrix products the counter
counts) are added from their shapes, and so is the CPU kernel of scaled-dot-product
attention, which the counter only knows in its CUDA forms. Latency is wall time of ``model(x)`` in inference mode, the
median over repeats after warm-up, with the device synchronised around each call, so
it is what a deployment would see on that device with PyTorch eager, in the precision and
memory format of the run (a conversion's ``runtime``; fp32 for ``theseus eval``). ONNX
Runtime or TensorRT timings differ and are not claimed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.runtime import current as current_runtime

LATENCY_BATCHES = (1, 64)
WARMUP = 3  # calls before timing; one when a call is slow (then allocator and kernels are warm after one)
SLOW_CALL_S = 0.05
MIN_REPEATS = 3
MAX_REPEATS = 200
TIME_BUDGET_S = 0.3  # per (model, batch size): repeats stop once this much time was spent, after MIN_REPEATS


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
    by_module = counter.get_flop_counts()
    root = type(model).__name__
    unseen = sum(f for path, f in rnn.items() if not sum(by_module.get(f"{root}.{path}", {}).values()))
    return int(counter.get_total_flops()) + unseen


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _repeat(sample, batch: int):
    """``sample`` (one example) repeated to ``batch`` rows."""
    if isinstance(sample, TokenBatch):
        return TokenBatch(sample.ids.expand(batch, -1).contiguous(), sample.mask.expand(batch, -1).contiguous())
    return sample.expand(batch, *sample.shape[1:]).contiguous()


@torch.inference_mode()
def measure_latency(model: nn.Module, sample, batch: int, device: torch.device,
                    budget_s: float = TIME_BUDGET_S) -> dict[str, float]:
    """Median / p90 milliseconds of one forward on ``batch`` copies of ``sample``, and samples per second."""
    rt = current_runtime(device)  # a conversion's precision and memory format, fp32 otherwise
    model.eval()
    x = rt.batch(_repeat(sample, batch))
    with rt.autocast():
        synchronize(device)
        t0 = time.perf_counter()
        run_model(model, x)
        synchronize(device)
        if time.perf_counter() - t0 < SLOW_CALL_S:
            for _ in range(WARMUP - 1):
                run_model(model, x)
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or spent < budget_s):
        synchronize(device)
        t0 = time.perf_counter()
        with rt.autocast():
            run_model(model, x)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    times.sort()
    median = statistics.median(times)
    return {"batch": batch, "median_ms": median * 1e3, "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
            "repeats": len(times), "samples_per_s": batch / median if median > 0 else float("inf")}


def profile_model(model: nn.Module, sample, device: torch.device, batches: tuple[int, ...] = LATENCY_BATCHES,
                  latency: bool = True) -> dict[str, Any]:
    """Params, FLOPs per example and (with ``latency``) latency at each batch size, of ``model`` on ``device``."""
    one = sample[:1]
    out: dict[str, Any] = {"params": count_params(model), "flops_per_example": count_flops(model, one.to(device))}
    if latency:
        threads = torch.get_num_threads() if device.type == "cpu" else None
        out["latency"] = {str(b): measure_latency(model, one, b, device) for b in batches}
        out["latency_device"] = str(device) + (f" ({threads} threads)" if threads else "")
    return out


def compare(guide: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """Target over guide for params, FLOPs and each latency measured on both."""
    ratios = {"params": target["params"] / max(1, guide["params"]),
              "flops": target["flops_per_example"] / max(1, guide["flops_per_example"])}
    for b, t in target.get("latency", {}).items():
        g = guide.get("latency", {}).get(b)
        if g:
            ratios[f"latency_b{b}"] = t["median_ms"] / g["median_ms"]
    return ratios
