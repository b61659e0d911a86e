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
Runtime or TensorRT timings differ and are not claimed. Guide and target are compared only when timed in the
same process in alternating rounds (:func:`profile_pair`, :mod:`theseus_cli.deploy.interleave`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.deploy.interleave import BUDGET_ENV, TIME_BUDGET_S, latency_budget  # noqa: F401  (public here too)
from theseus_cli.models.cost import count_flops, count_params  # noqa: F401  (public here too)
from theseus_cli.training.runtime import current_runtime

LATENCY_BATCHES = (1, 64)
WARMUP = 3  # calls before timing; one when a call is slow (then allocator and kernels are warm after one)
SLOW_CALL_S = 0.05
MIN_REPEATS = 3
MAX_REPEATS = 200


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat_example(sample, batch: int):
    """``sample`` (one example) repeated to ``batch`` rows."""
    if isinstance(sample, TokenBatch):
        return TokenBatch(sample.ids.expand(batch, -1).contiguous(), sample.mask.expand(batch, -1).contiguous())
    return sample.expand(batch, *sample.shape[1:]).contiguous()


def measure_latency(model: nn.Module, sample, batch: int, device: torch.device,
                    budget_s: float | None = None) -> dict[str, float]:
    """Median / p90 milliseconds of one forward on ``batch`` copies of ``sample``, and samples per second
    (``budget_s``: seconds to spend, default :func:`latency_budget`), in a conversion's precision and memory format
    (fp32 otherwise). One model's absolute latency; to compare two, use :func:`profile_pair`."""
    return time_calls(forward_call(model, sample, batch, device), batch, lambda: synchronize(device), budget_s)


def time_calls(call, batch: int, sync=lambda: None, budget_s: float | None = None) -> dict[str, float]:
    """Median / p90 milliseconds of ``call()`` (one forward on ``batch`` examples) after warm-up, repeated until
    ``budget_s`` seconds were spent (at least MIN_REPEATS, at most MAX_REPEATS), with ``sync()`` around each call;
    any runtime (PyTorch, ONNX Runtime) is timed the same way."""
    budget_s = latency_budget() if budget_s is None else budget_s
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    if time.perf_counter() - t0 < SLOW_CALL_S:
        for _ in range(WARMUP - 1):
            call()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or spent < budget_s):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    times.sort()
    median = statistics.median(times)
    return {"batch": batch, "median_ms": median * 1e3, "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
            "repeats": len(times), "samples_per_s": batch / median if median > 0 else float("inf")}


def _where(device: torch.device) -> dict[str, str]:
    threads = torch.get_num_threads() if device.type == "cpu" else None
    return {"latency_device": str(device) + (f" ({threads} threads)" if threads else ""),
            "latency_runtime": f"pytorch {torch.__version__.split('+')[0]} eager"}  # what measured it (vs onnxruntime)


def profile_model(model: nn.Module, sample, device: torch.device, batches: tuple[int, ...] = LATENCY_BATCHES,
                  latency: bool = True) -> dict[str, Any]:
    """Params, FLOPs per example and (with ``latency``) latency at each batch size, of ``model`` on ``device``."""
    one = sample[:1]
    out: dict[str, Any] = {"params": count_params(model), "flops_per_example": count_flops(model, one.to(device))}
    if latency:
        out["latency"] = {str(b): measure_latency(model, one, b, device) for b in batches}
        out.update(_where(device))
    return out


def forward_call(model: nn.Module, sample, batch: int, device: torch.device):
    """A no-argument call running ``model`` on ``batch`` copies of ``sample`` as :func:`measure_latency` times it."""
    rt = current_runtime(device)
    model.eval()
    x = rt.batch(repeat_example(sample, batch))

    @torch.inference_mode()
    def call() -> None:
        with rt.autocast():
            run_model(model, x)

    return call


def profile_pair(guide: nn.Module, target: nn.Module, sample, device: torch.device,
                 batches: tuple[int, ...] = LATENCY_BATCHES, latency: bool = True) -> dict[str, Any]:
    """``{"guide", "target", "ratios"}``: each model's params and FLOPs, and (with ``latency``) both timed in one
    process in alternating rounds at each batch size (:func:`theseus_cli.deploy.interleave.interleaved`), so that
    ``ratios["latency_b<N>"]`` is the median of per-round target/guide ratios, with its range beside it."""
    from theseus_cli.deploy.interleave import interleaved

    one = sample[:1]
    models = {"guide": guide, "target": target}
    out: dict[str, Any] = {name: {"params": count_params(m), "flops_per_example": count_flops(m, one.to(device))}
                           for name, m in models.items()}
    ratios = compare(out["guide"], out["target"])
    if latency:
        for name in models:
            out[name].update(latency={}, **_where(device))
        for b in batches:
            res = interleaved({name: forward_call(m, one, b, device) for name, m in models.items()}, b,
                              lambda: synchronize(device))
            for name in models:
                out[name]["latency"][str(b)] = res["models"][name]
            ratios.update(latency_ratios(res["ratios"]["target"], b, res["rounds"]))
    out["ratios"] = ratios
    return out


def latency_ratios(ratio: dict[str, float], batch: int, rounds: int) -> dict[str, Any]:
    """The report's keys for one interleaved ratio: ``latency_b1`` (median per-round target/guide), its range and
    how many rounds it is over."""
    return {f"latency_b{batch}": ratio["median"], f"latency_b{batch}_range": [ratio["min"], ratio["max"]],
            f"latency_b{batch}_rounds": rounds}


def compare(guide: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """Target over guide for params and FLOPs. Latency ratios come only from :func:`profile_pair`'s interleaved
    rounds: a ratio of two medians timed apart is not one."""
    return {"params": target["params"] / max(1, guide["params"]),
            "flops": target["flops_per_example"] / max(1, guide["flops_per_example"])}
