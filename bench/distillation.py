"""NoT against what a user would do instead — the target from scratch, the target distilled from the guide, the
paper's progressive distillation — and NoT with a teacher term in fine-tuning; every row over several seeds.

For each setting and each conversion seed (``--seeds``; the guide is trained once with seed 0 and the data subsets
keep seed 0, so only the conversion's streams vary: alignment order, replacement and baseline init, fine-tuning
and baseline shuffles), three conversions run on the same guide:

1. NoT with ``baseline.runs: [scratch, distill]`` — rows *scratch*, *distill* and *NoT*;
2. NoT with ``finetune.distill: {}`` (the guide as teacher on all training inputs, α 0.5, T 4) — row *NoT + KD ft*;
3. ``schedule.objective: distill`` — row *progressive KD* (the paper's Appendix I: stages trained on the KL of
   the hybrid's outputs; in-place replace recipes only, so transfer settings show "n/a").

Every method takes the same number of gradient steps (the conversion's alignment + fine-tuning steps) and sees the
same inputs: the labelled subset for the task loss, all training inputs for alignment and for the teacher terms.

Settings:
* ``demo`` — recipes/demo.yaml: ResNet-style CNN → all-Linear, Fashion-MNIST at random places on a 36×36 canvas,
  12k unlabelled inputs, 1,000 labels.
* ``resnet50-resnet18`` / ``resnet50-resnet18-untrained`` — bench/recipes/fmnist_resnet50_to_resnet18_small.yaml
  from the trained guide and from an untrained one (a fixed seeded initialisation): the paper's claim is that
  distillation cannot use an untrained teacher and NoT can.
* ``gpt2-rnn-1000`` — recipes/gpt2_attention_to_rnn.yaml with 1,000 training sequences (perplexity). Its guide
  (16M parameters) trains for 10 epochs on the whole corpus: a GPU setting (not in the default CPU run).
* ``gpt2-rnn-1000-cpu`` — the same conversion of a CPU-sized GPT-2 (4 blocks of width 64, the corpus's own 2,048-token
  BPE: ``common.cpu_sized_gpt2``), whose guide a 2-core CPU trains on the whole corpus in minutes.

A GPT-2 guide trains on every training sequence (``common.full_data_guide``); only the conversion gets 1,000.

Usage: python bench/distillation.py [--settings demo,...] [--seeds 0,1,2] [--device auto] [--small]
Writes runs/bench/distillation.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from common import (bench_progress, add_seeds_option, add_small_option, cached_guide, device_name, finished_report, guide_raw, mean_std,
                    merge, parse_seeds, setting_raw, settings_parser, smoke_note, untrained_guide)

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import parse_recipe

RESNET = "bench/recipes/fmnist_resnet50_to_resnet18_small.yaml"
SETTINGS = {
    "demo": {"recipe": "recipes/demo.yaml", "guide_epochs": 30, "guide_lr": 2e-3},
    "resnet50-resnet18": {"recipe": RESNET, "guide_epochs": 30, "guide_lr": 2e-3},
    "resnet50-resnet18-untrained": {"recipe": RESNET},
    "gpt2-rnn-1000": {"recipe": "recipes/gpt2_attention_to_rnn.yaml", "guide_epochs": 10, "guide_lr": 2e-3,
                      "override": {"data": {"train_limit": 1000}}, "default": False, "guide_data": "all"},
    "gpt2-rnn-1000-cpu": {"recipe": "recipes/gpt2_attention_to_rnn.yaml", "guide_epochs": 10, "guide_lr": 2e-3,
                          "override": {"data": {"train_limit": 1000}}, "default": False, "guide_data": "all",
                          "cpu_gpt2": True, "guide_name": "kjv-gpt2-cpu"},
}
METHODS = {  # name → (recipe changes, baselines trained in that conversion)
    "not": ({}, ["scratch", "distill"]),
    "not-kd-ft": ({"finetune": {"distill": {}}}, None),
    "progressive-kd": ({"schedule": {"objective": "distill"}}, None),
}
ROWS = ["scratch", "distill", "progressive-kd", "not", "not-kd-ft"]
LABELS = {"scratch": "target from scratch", "distill": "target distilled from the guide (KD)",
          "progressive-kd": "progressive distillation (paper App. I)", "not": "**NoT**",
          "not-kd-ft": "NoT + KD in fine-tuning"}
SMALL = {"data": {"train_limit": 128, "label_limit": 32, "test_limit": 64, "batch_size": 32},
         "align": {"epochs": 1, "max_steps_per_epoch": 2}, "finetune": {"epochs": 1},
         "bn_recalibration": {"batches": 2}}


def raw_recipe(spec: dict, small: bool) -> dict:
    raw = merge(setting_raw(spec), {"data": {"seed": 0}, "seed": 0})
    if small:
        raw = merge(raw, SMALL)
        if raw.get("task") == "causal-lm":
            raw = merge(raw, {"guide": {"kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}},
                              "data": {"sequence_length": 16}})
    return raw


def fixed_guide(name: str, spec: dict, raw: dict, device: str, small: bool) -> tuple[Path, dict]:
    """The setting's guide: trained once with seed 0 (cached), or a fixed seeded initialisation saved to a file."""
    recipe = parse_recipe(guide_raw(spec, raw, small), spec["recipe"])
    if "guide_epochs" in spec:
        return cached_guide(spec.get("guide_name", f"distill-{name}"), recipe, 1 if small else spec["guide_epochs"],
                            spec["guide_lr"], device)
    return untrained_guide(f"distill-{name}", recipe), {"trained": False}


def variant_pair(setting: str, variants: dict, seed: int, device: str, small: bool, out: Path) -> tuple[dict, dict]:
    """The reports of two recipe variants (``variants``: name → (recipe changes, baselines)) of a distillation setting
    at conversion ``seed``, on its guide, each in ``out / name``."""
    from common import variant_report

    spec = SETTINGS[setting]
    raw = raw_recipe(spec, small)
    guide, _ = fixed_guide(setting, spec, raw, device, small)
    first, second = (variant_report(raw, *changes, seed, guide, device, out / name, name)
                     for name, changes in variants.items())
    return first, second


def run_method(method: str, raw: dict, seed: int, guide: Path, device: str, out: Path) -> dict | None:
    changes, baselines = METHODS[method]
    data = merge(raw, {**changes, "seed": seed})
    if "target" in data and method == "progressive-kd":
        return None  # refused by the recipe: an architecture transfer has no hybrid output (App. I)
    if baselines:
        data = merge(data, {"baseline": {"runs": baselines}})
    recipe = parse_recipe(data, f"{method} seed {seed}")
    report = finished_report(out, recipe.digest(), guide) or run_conversion(
        recipe, out, ConvertOptions(progress=bench_progress(), checkpoint=guide, device=device, baseline=bool(baselines), overwrite=True,
                                    latency=False))
    m = report["metric"]
    found = {method: {"metric": m["target"], "seconds": report["wall_time"]["total"] -
                      sum(b["seconds"] for b in report["baselines"].values())}}
    for run, b in report["baselines"].items():
        found[run] = {"metric": b[m["name"]], "seconds": b["seconds"]}
    return {"guide": m["guide"], "name": m["name"], "higher_is_better": m["higher_is_better"], "rows": found,
            "steps": report["steps"]["alignment"] + report["steps"]["finetune"], "data": report["data"]}


def run_setting(name: str, spec: dict, seeds: list[int], device: str, out_root: Path, small: bool) -> dict:
    raw = raw_recipe(spec, small)
    guide, guide_info = fixed_guide(name, spec, raw, device, small)
    per_row: dict[str, list[float]] = {r: [] for r in ROWS}
    seconds: dict[str, list[float]] = {r: [] for r in ROWS}
    info: dict = {}
    for seed in seeds:
        for method in METHODS:
            got = run_method(method, raw, seed, guide, device, out_root / name / f"{method}-s{seed}")
            if got is None:
                continue
            info = got
            for row, value in got["rows"].items():
                per_row[row].append(value["metric"])
                seconds[row].append(value["seconds"])
            print(f"{name} seed {seed} {method}: {got['rows'][method]['metric']:.4f}", file=sys.stderr, flush=True)
    return {"setting": name, "recipe": spec["recipe"], "small": small, "seeds": seeds, "guide_training": guide_info,
            "guide": info["guide"], "metric": info["name"], "higher_is_better": info["higher_is_better"],
            "steps": info["steps"], "data": info["data"], "values": per_row, "seconds": seconds}


def verdict(r: dict) -> str:
    """Which method wins and by how much (means over seeds), and how NoT compares with distillation per seed."""
    sign = 1 if r["higher_is_better"] else -1
    means = {row: mean_std(v)[0] for row, v in r["values"].items() if v}
    ranked = sorted(means, key=lambda row: -sign * means[row])
    best, second = ranked[0], ranked[1]
    nots = [row for row in ("not", "not-kd-ft") if row in means]
    best_not = max(nots, key=lambda row: sign * means[row])
    diffs = [sign * (a - b) for a, b in zip(r["values"][best_not], r["values"]["distill"])]
    d_mean, d_std = mean_std(diffs)
    wins = sum(d > 0 for d in diffs)
    text = (f"best: {LABELS[best].strip('*')} ({means[best]:.4f}), ahead of {LABELS[second].strip('*')} by "
            f"{abs(means[best] - means[second]):.4f}. {LABELS[best_not].strip('*')} − KD: {d_mean:+.4f} ± {d_std:.4f} "
            f"({'better' if sign > 0 else 'lower perplexity'} in {wins} of {len(diffs)} seeds)")
    if r["higher_is_better"] and r["guide"] > 0.2:
        text += f"; retention {means[best_not] / r['guide']:.3f}"
    return text


def markdown(rows: list[dict], device: str) -> str:
    lines = []
    for r in rows:
        f = "{:.2f}" if r["metric"] == "perplexity" else "{:.4f}"
        d = r["data"]
        guide = f.format(r["guide"]) + ("" if r["guide_training"].get("trained", True) else " (untrained)")
        lines += [f"**{r['setting']}** — {r['metric']}, guide {guide}; {d['train']:,} training inputs, "
                  f"{d['labelled']:,} labelled; {r['steps']:,} gradient steps per method; seeds {r['seeds']}",
                  "", f"| method | {r['metric']} (mean ± std) | per seed | s per run |", "|---|---|---|---|"]
        for row in ROWS:
            v = r["values"][row]
            if not v:
                lines.append(f"| {LABELS[row]} | n/a (refused: needs in-place replacements) | | |")
                continue
            mean, std = mean_std(v)
            lines.append(f"| {LABELS[row]} | {f.format(mean)} ± {f.format(std)} | {', '.join(f.format(x) for x in v)} | "
                         f"{mean_std(r['seconds'][row])[0]:.0f} |")
        lines += ["", verdict(r), ""]
    note = smoke_note(rows)
    return "\n".join(lines) + f"\nDevice: {device}.{note}\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench")
    add_seeds_option(parser)
    add_small_option(parser)
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown} (valid: {', '.join(SETTINGS)})")
    out_root = Path(args.out)
    rows = [run_setting(n, SETTINGS[n], seeds, args.device, out_root, args.small) for n in names]
    dev = device_name(args.device)
    result = {"date": datetime.date.today().isoformat(), "device": dev, "command": " ".join(sys.argv), "rows": rows}
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "distillation.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, dev)
    (out_root / "distillation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
