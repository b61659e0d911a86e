"""Memory and time of converting a 1.17B Llama-shaped decoder on one CPU: today's pipeline against the memory-lean
one (issue 39).

The conversion is ``recipes/llama_linear_attention_blockwise.yaml``. The guide has TinyLlama's shape (22 layers, width 2,048, MLP 5,632, 32 heads, 4 key/value heads) with the corpus's
GPT-2 BPE (50,257 tokens): 1,175,910,400 parameters, random weights (no such weights are offline). Every attention
becomes ``linear_attention`` aligned at its decoder layer. Each measurement runs in a fresh process, which reports
its own peak resident memory (``VmHWM``), so one's allocations never count in another's:

* ``progressive-stage`` (today): float32 guide, the hybrid a ``deepcopy`` of it, the first progressive stage;
* ``full-step`` (today): one full fine-tuning step of that hybrid — refused by the plan-time memory check on a
  machine without the room for it (the refusal and its figure are the result);
* ``blockwise-block`` (new): bfloat16 frozen guide (``runtime.precision: bf16`` with ``finetune.peft``), the hybrid
  sharing its tensors, the guide pass storing every layer's inputs to disk, then one block trained from them;
* ``lora-step`` (new): the same hybrid with all 22 replacements, LoRA (rank 8) on the kept linears, activation
  checkpointing: fine-tuning steps;
* ``end-to-end`` (new): ``run_conversion`` of the whole recipe — block-wise alignment of the 22 layers, then LoRA
  fine-tuning, on a small token budget — against the bound of the issue's done-when: 1.3 × the guide's weights in
  the run's precision plus the trained parameters' state (float32 weights, gradients and AdamW's two moments);
* ``end-to-end-mmap`` (new): the same, with glibc's malloc mapping every allocation over 128 KiB on its own
  (``MALLOC_MMAP_THRESHOLD_``), so one step's freed activations are given back rather than kept in the heap.

Seconds per step are the measured steps' mean, the first (which pays for one-time allocations) included. The peak is
reported raw and above the interpreter's own resident memory once torch, transformers and theseus are imported
(about 0.53 GiB, torch's libraries mostly), which no conversion can shed. The guide's model code, imported later,
counts above it (``modeling_llama`` maps Triton's library: 70 MB of code), so the figure above the interpreter
is, if anything, high.
Disk per 1M tokens is the store's bytes over the tokens it holds.

Usage: python bench/llm_memory.py [--small] [--only NAME,...] [--tokens 128] [--samples 32]
Writes runs/bench-llm-memory/llm_memory.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_SMALL = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 50257, "max_position_embeddings": 256}
MEASURES = ("progressive-stage", "full-step", "blockwise-block", "lora-step", "end-to-end", "end-to-end-mmap")
PIPELINE = {"progressive-stage": "today", "full-step": "today", "blockwise-block": "new", "lora-step": "new",
            "end-to-end": "new", "end-to-end-mmap": "new"}
# end-to-end-mmap: the same run with glibc's malloc told to map every allocation over 128 KiB on its own (and give it
# back when freed) instead of raising that threshold as large blocks are freed: the freed activations of one step
# are not kept in the heap, at the price of page faults
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


RECIPE = ROOT / "recipes" / "llama_linear_attention_blockwise.yaml"


def recipe_raw(small: bool, tokens: int, samples: int, lean: bool) -> dict:
    """The shipped recipe (the new pipeline), at the chosen size and token budget; ``lean=False``: today's pipeline
    on the same conversion (progressive schedule, float32 weights, full fine-tuning, no checkpointing)."""
    import yaml

    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"].update({"sequence_length": tokens, "train_limit": samples})
    if small:
        raw["guide"]["kwargs"] = dict(LLAMA_SMALL)
    if not lean:
        raw["schedule"] = {"kind": "progressive"}
        raw["runtime"] = {"precision": "fp32"}
        raw["finetune"] = {k: v for k, v in raw["finetune"].items() if k not in ("peft", "checkpointing")}
    return raw


def current_rss() -> int:
    """Resident memory now: measured once the imports are done, it is the process's fixed cost (torch's libraries
    alone are ~0.5 GB resident), which the peak above baseline leaves out."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_progress():
    """Plain progress lines, each with the resident memory now and the peak so far: where the peak happens."""
    from theseus_cli.progress import LineProgress

    class MemoryLines(LineProgress):
        def write(self, line: str) -> None:
            super().write(f"{line} (RSS {current_rss() / 2**30:.2f} GiB, peak {peak_rss() / 2**30:.2f} GiB)")

    return MemoryLines()


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _conversion(raw: dict, out: Path, finetune_epochs: int | None = None):
    from theseus_cli.config.recipe import parse_recipe
    from theseus_cli.pipelines.convert import Conversion, ConvertOptions
    from theseus_cli.training.runtime import conversion_runtime, frozen_weights_dtype
    from theseus_cli.training.session import open_session

    if finetune_epochs is not None:
        raw = {**raw, "finetune": {**raw["finetune"], "epochs": finetune_epochs}}
    recipe = parse_recipe(raw, "llm_memory")
    session = open_session(recipe, None, "cpu", weights_dtype=frozen_weights_dtype(recipe))
    rt = conversion_runtime(recipe, session.device, session.data)  # as run_conversion does
    conv = Conversion(session, rt, out, ConvertOptions(device="cpu", latency=False), memory_progress(), time.perf_counter())
    return conv, rt


def _align_one(conv, rt, stage_index: int, steps: int) -> dict:
    import dataclasses

    from theseus_cli.training import align_stage
    from theseus_cli.training.runtime import using

    job = conv._align_job()
    if conv.recipe.schedule.kind == "blockwise":
        from theseus_cli.pipelines.blockwise import block_store

        job = dataclasses.replace(job, cache=block_store(conv))
    stages = conv.plan_.stages
    for stage in stages[:stage_index + 1]:
        conv.introduce(conv.target, stage)
    cfg = conv.recipe.align.model_copy(update={"max_steps_per_epoch": steps})
    with using(rt):
        result = align_stage(stage_index, conv.guide, conv.target, stages[stage_index], conv.session.data.x_train,
                             dataclasses.replace(job, cfg=cfg))
    return {"steps": result.steps, "seconds": result.seconds, "trained_params": sum(
        p.numel() for path in stages[stage_index].trained for p in conv.target.get_submodule(path).parameters())}


def measure(name: str, raw: dict, out: Path, steps: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from theseus_cli.errors import TheseusError
    from theseus_cli.training.runtime import using

    import transformers  # noqa: F401  (the interpreter's fixed cost, counted in the baseline)

    import theseus_cli.pipelines.convert  # noqa: F401

    started = time.perf_counter()
    result: dict = {"measure": name, "pipeline": PIPELINE[name], "baseline_rss_bytes": current_rss()}
    if name in ("end-to-end", "end-to-end-mmap"):
        from theseus_cli.config.recipe import parse_recipe
        from theseus_cli.pipelines.convert import ConvertOptions, run_conversion
        report = run_conversion(parse_recipe(raw, "llm_memory"), out, ConvertOptions(
            device="cpu", latency=False, overwrite=True, progress=memory_progress()))
        result.update({"alignment_seconds": report["wall_time"]["alignment"], "total_seconds": report["wall_time"]["total"],
                       "steps": report["steps"], "store": report["alignment_store"],
                       "trained_params": report["finetune"]["peft"]["trainable_params"],
                       "finetune_seconds": report["finetune"]["seconds"],
                       "perplexity": {"guide": report["metric"]["guide"], "target": report["metric"]["target"]}})
    elif name == "full-step":
        try:
            conv, rt = _conversion(raw, out)
            conv.plan()
            result["refused"] = None
        except TheseusError as exc:
            result["refused"] = str(exc)
            result["exit_code"] = exc.exit_code
    elif name in ("progressive-stage", "blockwise-block"):
        conv, rt = _conversion(raw, out, finetune_epochs=0 if name == "progressive-stage" else None)
        conv.plan()
        result.update(_align_one(conv, rt, 0, steps))
        if conv.recipe.schedule.kind == "blockwise":
            result["store"] = block_summary(conv)
    elif name == "lora-step":
        from theseus_cli.training.checkpointing import activation_checkpointing
        from theseus_cli.training.lora import attach_lora

        conv, rt = _conversion(raw, out)
        conv.plan()
        for stage in conv.plan_.stages:
            conv.introduce(conv.target, stage)
        adapters = attach_lora(conv.target, conv.recipe.finetune.peft, [e.path for e in conv.plan_.entries])
        with using(rt), activation_checkpointing(conv.target, True):
            ft = conv.train_on_task(conv.target, steps, 0, 1e-4, "finetune", "LoRA steps", marked_only=True)
        result.update({"steps": steps, "seconds": ft.seconds, "trained_params": adapters.trainable})
    result["peak_rss_bytes"] = peak_rss()
    result["wall_seconds"] = time.perf_counter() - started
    result["torch_threads"] = torch.get_num_threads()
    return result


def block_summary(conv) -> dict:
    from theseus_cli.training.block_store import BLOCKS_DIR

    root = conv.out / BLOCKS_DIR
    size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    data = conv.session.data
    tokens = int(data.x_train.shape[0]) * int(data.x_train.shape[1])
    return {"bytes": size, "tokens": tokens, "bytes_per_million_tokens": size / tokens * 1e6}


def guide_facts(raw: dict) -> dict:
    """Parameter count of the guide and of the target (every attention replaced), without building 1.17B weights."""
    import torch
    import transformers

    from theseus_cli.replacements.linear_attention import LinearAttention

    kw = raw["guide"]["kwargs"]
    config = transformers.AutoConfig.for_model("llama", **kw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
        width = kw["hidden_size"]
        replacement = LinearAttention(width, width, kw["num_attention_heads"], "elu1", True)
    guide = sum(p.numel() for p in model.parameters())
    attention = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
    new = sum(p.numel() for p in replacement.parameters())
    layers = kw["num_hidden_layers"]
    return {"guide_params": guide, "replaced_params": attention * layers, "replacement_params": new * layers,
            "target_params": guide - attention * layers + new * layers}


def run_child(name: str, args, lean: bool) -> dict:
    raw = recipe_raw(args.small, args.tokens, args.samples, lean)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        spec = json.dumps({"name": name, "raw": raw, "out": str(Path(tmp) / "run"), "steps": args.steps})
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(MMAP_ENV if name == "end-to-end-mmap" else {})}
        proc = subprocess.run([sys.executable, __file__, "--child", spec], stdout=subprocess.PIPE, text=True, env=env)  # its progress lines go to stderr as they come
    if proc.returncode != 0:
        return {"measure": name, "pipeline": PIPELINE[name], "failed": f"exit {proc.returncode} (its stderr above)"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bound(facts: dict, e2e: dict) -> dict:
    """The done-when's bound: 1.3 × the guide's bf16 weights plus 16 bytes per trained parameter (float32 weight,
    gradient and AdamW's two moments), against the peak above the process's fixed cost and against the raw peak."""
    guide_bytes = facts["guide_params"] * 2
    state = e2e["trained_params"] * 16
    limit = 1.3 * guide_bytes + state
    above = e2e["peak_rss_bytes"] - e2e["baseline_rss_bytes"]
    return {"guide_bytes_bf16": guide_bytes, "trained_state_bytes": state, "bound_bytes": limit,
            "peak_above_baseline_bytes": above, "within_above_baseline": above <= limit,
            "within_raw_peak": e2e["peak_rss_bytes"] <= limit}


def markdown(rows: list[dict], facts: dict, args) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rss = lambda r: f"{gib(r['peak_rss_bytes'])} ({gib(r['peak_rss_bytes'] - r['baseline_rss_bytes'])})"  # noqa: E731
    lines = [f"Guide: Llama-shaped, {facts['guide_params']:,} parameters (random weights); target: every attention → "
             f"linear_attention, {facts['target_params']:,} parameters. {args.samples} sequences × {args.tokens} tokens; "
             f"CPU, {rows[0].get('torch_threads', '?')} torch threads.", "",
             "| pipeline | measurement | peak RSS (above the interpreter's) | s / step | steps | trained params | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['pipeline']} | {r['measure']} | — | — | — | — | failed: {r['failed'][:120]} |")
            continue
        if r["measure"] == "full-step":
            note = f"refused before any step: {r['refused']}" if r.get("refused") else "fits this machine"
            lines.append(f"| {r['pipeline']} | {r['measure']} | {rss(r)} (plan only) | — | — | "
                         f"{facts['target_params']:,} | {note} |")
            continue
        per = (r["seconds"] / r["steps"]) if r.get("steps") and isinstance(r["steps"], int) else None
        note = ""
        if r.get("store"):
            per_million = r["store"]["bytes"] / (r["store"]["samples"] * args.tokens) * 1e6 \
                if "samples" in r["store"] else r["store"]["bytes_per_million_tokens"]
            note = f"store {r['store']['bytes'] / 2**20:,.0f} MiB on disk = {per_million / 2**30:.1f} GiB per 1M tokens"
        if r["measure"] in ("end-to-end", "end-to-end-mmap"):
            note = (f"alignment {r['alignment_seconds']:.0f} s, fine-tuning {r['finetune_seconds']:.0f} s, total "
                    f"{r['total_seconds']:.0f} s; perplexity guide {r['perplexity']['guide']:.0f} → target "
                    f"{r['perplexity']['target']:.0f}")
            limits = r.get("bound")
            if limits:
                note += (f"; bound 1.3 × {gib(limits['guide_bytes_bf16'])} + {gib(limits['trained_state_bytes'])} = "
                         f"{gib(limits['bound_bytes'])}: above the interpreter's "
                         f"{'within' if limits['within_above_baseline'] else 'OVER'}, raw peak "
                         f"{'within' if limits['within_raw_peak'] else 'OVER'}")
        steps = r["steps"] if isinstance(r.get("steps"), int) else \
            f"{r['steps']['alignment']} + {r['steps']['finetune']}" if r.get("steps") else "—"
        lines.append(f"| {r['pipeline']} | {r['measure']} | {rss(r)} | "
                     f"{f'{per:.2f}' if per else '—'} | {steps} | {r.get('trained_params', 0):,} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="a 3-layer width-64 guide (a smoke run, minutes)")
    parser.add_argument("--only", default=",".join(MEASURES))
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--samples", type=int, default=32, help="training sequences (alignment and fine-tuning)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed measurement")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-llm-memory"))
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["name"], spec["raw"], Path(spec["out"]), spec["steps"])))
        return
    (ROOT / "runs").mkdir(exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(MEASURES))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (valid: {', '.join(MEASURES)})")
    facts = guide_facts(recipe_raw(args.small, args.tokens, args.samples, True))
    rows = []
    for name in names:
        print(f"[llm_memory] {name} …", file=sys.stderr, flush=True)
        rows.append(run_child(name, args, lean=PIPELINE[name] == "new"))
    for row in rows:  # each end-to-end run against the done-when's bound
        if row["measure"].startswith("end-to-end") and "failed" not in row:
            row["bound"] = bound(facts, row)
    table = markdown(rows, facts, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_memory.json").write_text(json.dumps({"facts": facts, "rows": rows, "small": args.small,
                                                     "tokens": args.tokens, "samples": args.samples,
                                                     "date": time.strftime("%Y-%m-%d")}, indent=2))
    (out / "llm_memory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
