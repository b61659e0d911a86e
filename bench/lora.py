"""LoRA fine-tuning against full fine-tuning after the same alignment (issue 39), with the baselines, per seed.

For each setting and conversion seed, on the setting's guide (bench/distillation.py's, cached):

1. NoT with full fine-tuning (every parameter, AdamW) and ``baseline.runs: [scratch, distill]`` — rows *NoT, full
   fine-tuning*, *scratch*, *distill*, all at the conversion's gradient steps;
2. the same NoT with ``finetune.peft: {}`` (PEFT's LoRA, rank 8, α 16, on the kept Linear / Conv1D layers; the
   replacements trained in full; the kept weights frozen and shared with the guide) — row *NoT, LoRA*.

Both conversions align identically (same seed, same stages) and fine-tune for the same steps; what differs is what
fine-tuning trains. The table gives the test metric, the fine-tuning seconds and the parameters fine-tuning trains.

Settings: ``gpt2-rnn-1000-cpu`` — the CPU-sized GPT-2 → RNN row of bench/distillation.py (every attention → a
2-layer Elman RNN, 1,000 training sequences, perplexity); its kept layers are the MLPs' Conv1D projections.

Usage: python bench/lora.py [--settings gpt2-rnn-1000-cpu] [--seeds 0,1,2] [--device cpu] [--small]
Writes runs/bench-lora/lora.{json,md} and prints the markdown table.
"""

from __future__ import annotations

from pathlib import Path

from common import pm, seeded_settings_main, smoke_note
from distillation import variant_pair


SETTINGS = {"gpt2-rnn-1000-cpu": {"distill": "gpt2-rnn-1000-cpu"}}
VARIANTS = {"full": ({}, ["scratch", "distill"]), "lora": ({"finetune": {"peft": {}}}, None)}


def run_one(name: str, spec: dict, out: Path, seed: int, device: str, small: bool) -> dict:
    full, lora = variant_pair(spec["distill"], VARIANTS, seed, device, small, out)
    m = full["metric"]
    peft = lora["finetune"]["peft"]
    return {"setting": name, "small": small, "metric_name": m["name"], "higher_is_better": m["higher_is_better"],
            "full": m["target"], "lora": lora["metric"]["target"], "guide": m["guide"],
            "scratch": m["baselines"]["scratch"], "distill": m["baselines"]["distill"],
            "full_ft_seconds": full["finetune"]["seconds"], "lora_ft_seconds": lora["finetune"]["seconds"],
            "full_trained_params": full["params"]["target"], "lora_trained_params": peft["trainable_params"],
            "lora_frozen_params": peft["frozen_params"], "lora_modules": peft["modules"],
            "steps": full["steps"]["alignment"] + full["steps"]["finetune"],
            "wall_time": {"total": full["wall_time"]["total"] + lora["wall_time"]["total"]}}


def markdown(rows: list, device: str) -> str:
    lines = [f"Device: {device}.{smoke_note(rows)}", "",
             "| setting | metric | NoT, full fine-tuning | NoT, LoRA | scratch | distill | guide | fine-tuning s: full / LoRA "
             "| trained in fine-tuning: full / LoRA |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['metric_name']} | {pm(r, 'full')} | {pm(r, 'lora')} | {pm(r, 'scratch')} | "
                     f"{pm(r, 'distill')} | {r['guide']:.4f} | {r['full_ft_seconds']:.0f} / {r['lora_ft_seconds']:.0f} | "
                     f"{r['full_trained_params']:,.0f} / {r['lora_trained_params']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    seeded_settings_main(__doc__, SETTINGS, "bench-lora", "lora", run_one, markdown)


if __name__ == "__main__":
    main()
