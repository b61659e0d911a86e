"""Block-wise alignment from stored block inputs against the progressive schedule, with the baselines, per seed
(issue 39).

For each setting and conversion seed, on the setting's guide (bench/distillation.py's, cached):

1. NoT with the recipe's progressive schedule and ``baseline.runs: [scratch, distill]`` — rows *progressive*,
   *scratch*, *distill*, all at the conversion's gradient steps;
2. the same NoT with ``schedule.kind: blockwise`` — row *blockwise*: one guide pass stores every aligned block's
   inputs and outputs on disk, then each block's replacement trains from them alone (the same number of alignment
   steps per stage, the same fine-tuning).

What differs is only what a stage's replacement sees: progressive trains replacements 1..t on the hybrid's own
activations (each stage re-runs the hybrid up to its deepest block); blockwise trains replacement t alone, fed the
guide's input there. The table gives the test metric after alignment and after fine-tuning, the alignment's wall
seconds (blockwise: including its guide pass) and the store's size.

Settings: ``gpt2-rnn-1000-cpu`` — the CPU-sized GPT-2 → RNN row of bench/distillation.py (every attention → a
2-layer Elman RNN aligned at its block, 1,000 training sequences, perplexity).

Usage: python bench/blockwise.py [--settings gpt2-rnn-1000-cpu] [--seeds 0,1,2] [--device cpu] [--small]
Writes runs/bench-blockwise/blockwise.{json,md} and prints the markdown table.
"""

from __future__ import annotations

from pathlib import Path

from common import pm, seeded_settings_main, smoke_note
from distillation import variant_pair


SETTINGS = {"gpt2-rnn-1000-cpu": {"distill": "gpt2-rnn-1000-cpu"}}
VARIANTS = {"progressive": ({}, ["scratch", "distill"]), "blockwise": ({"schedule": {"kind": "blockwise"}}, None)}


def run_one(name: str, spec: dict, out: Path, seed: int, device: str, small: bool) -> dict:
    prog, block = variant_pair(spec["distill"], VARIANTS, seed, device, small, out)
    m, b = prog["metric"], block["metric"]
    return {"setting": name, "small": small, "metric_name": m["name"], "higher_is_better": m["higher_is_better"],
            "progressive": m["target"], "blockwise": b["target"],
            "progressive_aligned": m["target_after_alignment"], "blockwise_aligned": b["target_after_alignment"],
            "guide": m["guide"], "scratch": m["baselines"]["scratch"], "distill": m["baselines"]["distill"],
            "progressive_align_seconds": prog["wall_time"]["alignment"],
            "blockwise_align_seconds": block["wall_time"]["alignment"],
            "guide_pass_seconds": block["alignment_store"]["seconds"], "store_bytes": block["alignment_store"]["bytes"],
            "align_steps": prog["steps"]["alignment"], "blockwise_align_steps": block["steps"]["alignment"],
            "steps": prog["steps"]["alignment"] + prog["steps"]["finetune"],
            "wall_time": {"total": prog["wall_time"]["total"] + block["wall_time"]["total"]}}


def markdown(rows: list, device: str) -> str:
    lines = [f"Device: {device}.{smoke_note(rows)}", "",
             "| setting | metric | progressive: aligned → fine-tuned | blockwise: aligned → fine-tuned | scratch | "
             "distill | guide | alignment s: progressive / blockwise (guide pass) | store |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['metric_name']} | {pm(r, 'progressive_aligned', '{:.2f}')} → "
                     f"{pm(r, 'progressive', '{:.2f}')} | {pm(r, 'blockwise_aligned', '{:.2f}')} → "
                     f"{pm(r, 'blockwise', '{:.2f}')} | {pm(r, 'scratch', '{:.2f}')} | {pm(r, 'distill', '{:.2f}')} | "
                     f"{r['guide']:.2f} | {pm(r, 'progressive_align_seconds', '{:.0f}')} / "
                     f"{pm(r, 'blockwise_align_seconds', '{:.0f}')} ({pm(r, 'guide_pass_seconds', '{:.1f}')}) | "
                     f"{r['store_bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    seeded_settings_main(__doc__, SETTINGS, "bench-blockwise", "blockwise", run_one, markdown)


if __name__ == "__main__":
    main()
