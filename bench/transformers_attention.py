"""Attention replaced in transformers: GPT-2 → Elman RNN (perplexity) and all-MiniLM-L6-v2 → token MLPs (cosine).

Settings (each one conversion with its naive baseline, in the same run). ``-attn``
aligns each replacement's own output (the module it replaces); ``-block`` aligns
the output of the transformer block around it (``align_up``), where the residual
stream fixes the basis that CKA alone leaves free.

* ``gpt2-rnn-*`` — a small GPT-2 (recipes/gpt2_attention_to_rnn.yaml) trained here
  on the King James Bible (cached under .cache/bench), every attention → 2 Elman RNN
  layers; held-out perplexity of guide, NoT target and naive baseline (the same
  hybrid architecture from scratch, same gradient steps).
* ``*-fewtokens`` — the same guide, but conversion and baseline see only
  ``FEW_SEQUENCES`` training sequences: the naive target is data-starved there.
* ``minilm-mlp-*`` — the pretrained all-MiniLM-L6-v2 encoder (nobody here trained
  it), every self-attention → token MLP; mean cosine similarity between guide and
  target sentence embeddings on held-out verses, NoT vs naive (from scratch).
* ``minilm-mlp-block-inherit`` — ablation: the baseline keeps every guide weight
  except the attention replacements (``baseline.runs: [guide-init]``), i.e. conversion
  without the alignment stages, same steps.
* ``minilm-mlp-block-fewsentences`` — conversion and baseline see ``FEW_SENTENCES``.

``--small`` shrinks models, data and steps to a CPU smoke run (seconds); its
figures mean nothing and are marked so. Usage:
    python bench/transformers_attention.py [--settings gpt2-rnn-block,minilm-mlp-block] [--seeds 0,1,2] [--device auto] [--small]
Writes runs/bench/transformers_attention.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from common import (bench_progress, ROOT, add_seeds_option, add_small_option, cached_guide, pm, run_settings, settings_parser,
                    smoke_note, the_baseline, with_seed)

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import parse_recipe

FEW_SEQUENCES = 1000
FEW_SENTENCES = 2000
GPT2 = "recipes/gpt2_attention_to_rnn.yaml"
MINILM = "recipes/minilm_attention_to_mlp.yaml"
_GPT2 = {"recipe": GPT2, "guide_epochs": 10, "guide_lr": 2e-3}
SETTINGS = {  # align_up: 0 aligns each replacement's own output, >0 the block around it (the residual stream)
    "gpt2-rnn-attn": {**_GPT2, "align_up": 0, "override": {}},
    "gpt2-rnn-block": {**_GPT2, "align_up": 1, "override": {}},
    "gpt2-rnn-attn-fewtokens": {**_GPT2, "align_up": 0, "override": {"data": {"train_limit": FEW_SEQUENCES}}},
    "gpt2-rnn-block-fewtokens": {**_GPT2, "align_up": 1, "override": {"data": {"train_limit": FEW_SEQUENCES}}},
    "minilm-mlp-attn": {"recipe": MINILM, "align_up": 0, "override": {}},
    "minilm-mlp-block": {"recipe": MINILM, "align_up": 2, "override": {}},
    "minilm-mlp-block-inherit": {"recipe": MINILM, "align_up": 2, "override": {"baseline": {"runs": ["guide-init"]}}},
    "minilm-mlp-block-fewsentences": {"recipe": MINILM, "align_up": 2, "override": {"data": {"train_limit": FEW_SENTENCES}}},
}
SMALL = {  # CPU smoke run: same code path, toy sizes
    GPT2: {"guide": {"kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}},
           "data": {"sequence_length": 16, "train_limit": 64, "test_limit": 16, "batch_size": 16},
           "align": {"epochs": 1, "max_steps_per_epoch": 2}, "finetune": {"epochs": 1}},
    MINILM: {"data": {"sequence_length": 16, "train_limit": 48, "test_limit": 16, "batch_size": 16},
             "align": {"epochs": 1, "max_steps_per_epoch": 1}, "finetune": {"epochs": 1}},
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_for(path: str, override: dict, small: bool, align_up: int):
    """The shipped recipe, with the setting's (and --small's) changes; relative paths as in the file."""
    raw = yaml.safe_load((ROOT / path).read_text())
    raw["replace"] = [{**rule, "align_up": align_up} for rule in raw["replace"]]
    raw["baseline"] = {**raw.get("baseline", {}), "runs": ["scratch"]}  # distillation: bench/distillation.py
    shrink = (lambda r: merge(r, SMALL[path])) if small else (lambda r: r)  # noqa: E731
    return parse_recipe(shrink(raw), path), parse_recipe(shrink(merge(raw, override)), path)


def run_setting(name: str, spec: dict, device: str, out_root: Path, small: bool, seed: int | None = None) -> dict:
    guide_recipe, recipe = recipe_for(spec["recipe"], spec["override"], small, spec["align_up"])
    guide = None
    checkpoint = None
    if "guide_epochs" in spec:  # trained here on the full training split, reused by every setting
        epochs = 1 if small else spec["guide_epochs"]
        checkpoint, guide = cached_guide("gpt2-kjv", guide_recipe, epochs, spec["guide_lr"], device)
    report = run_conversion(with_seed(recipe, seed), out_root / name, ConvertOptions(progress=bench_progress(), checkpoint=checkpoint, device=device, baseline=True,
                                                                    overwrite=True, latency=not small))  # no timings read here
    m = report["metric"]
    run, base = the_baseline(report)
    better = (m["target"] - base["metric"]) if m["higher_is_better"] else (base["metric"] - m["target"])
    return {
        "setting": name, "recipe": spec["recipe"], "align_up": spec["align_up"], "override": spec["override"], "small": small,
        "metric": m["name"], "guide": m["guide"], "not_aligned_only": m["target_after_alignment"], "not": m["target"],
        "naive": base["metric"], "naive_init": run, "retention": m["retention"],
        "not_better_by": better, "data": report["data"], "guide_training": guide, "params": report["params"],
        "steps": report["steps"], "similarity_after_alignment": report["similarity"]["after_alignment"],
        "wall_time": report["wall_time"], "baseline_seconds": base["seconds"], "device": report["device"],
    }


def markdown(rows: list[dict], device: str) -> str:
    lines = ["| setting | align_up | metric | train seqs | guide | NoT (aligned only) | NoT | naive (init) | NoT better by | "
             "params guide → target | steps align + ft (= naive) | wall s (conversion, naive) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = "{:.2f}" if r["metric"] == "perplexity" else "{:.4f}"
        lines.append(
            f"| {r['setting']} | {r['align_up']} | {r['metric']} | {r['data']['train']} | {f.format(r['guide'])} | {pm(r, 'not_aligned_only', f)} | "
            f"{pm(r, 'not', f)} | {pm(r, 'naive', f)} ({r['naive_init']}) | {pm(r, 'not_better_by', f)} | "
            f"{r['params']['guide']:,} → {r['params']['target']:,} | {r['steps']['alignment']} + {r['steps']['finetune']} | "
            f"{r['wall_time']['total'] - r['baseline_seconds']:.0f}, {r['baseline_seconds']:.0f} |")
    note = smoke_note(rows)
    return "\n".join(lines) + f"\n\nDevice: {device}.{note}\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench")
    add_small_option(parser)
    add_seeds_option(parser)
    args = parser.parse_args()
    run_settings(parser, args, SETTINGS, "transformers_attention",
                 lambda name, spec, out, seed: run_setting(name, spec, args.device, out, args.small, seed), markdown)


if __name__ == "__main__":
    main()
