"""Architecture transfer (issue #5): a deeper guide rebuilt as a different, shallower target block by block,
vs the same target trained from scratch for the same number of steps — at CPU scale, in one invocation.

Settings:

* ``resnet-trained`` — ResNet-50-style guide (bottleneck blocks 3-4-6-3) trained here (cached under
  .cache/bench) → ResNet-18-style target (basic blocks 2-2-2-2), both at 1/8 of torchvision's widths, on
  few-label, randomly placed Fashion-MNIST (bench/recipes/fmnist_resnet50_to_resnet18_small.yaml), where
  the from-scratch target is data-starved.
* ``resnet-untrained`` — the same conversion from the untrained (seeded) guide: the paper reports NoT
  beating the from-scratch target even then.
* ``gpt2-deep-shallow`` — an 8-block GPT-2 trained here on the King James Bible → a 4-block GPT-2
  (bench/recipes/kjv_gpt2_deep_to_shallow_small.yaml); held-out perplexity.

Usage: python bench/architecture_transfer.py [--settings resnet-trained,resnet-untrained,gpt2-deep-shallow] [--seeds 0,1,2]
       [--device auto]
Writes runs/bench-transfer/architecture_transfer.{json,md} and prints the markdown table.
"""

from __future__ import annotations

from pathlib import Path

from common import bench_progress, ROOT, add_seeds_option, cached_guide, only_baseline, pm, run_settings, settings_parser, untrained_guide, with_seed

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import load_recipe

RESNET = "bench/recipes/fmnist_resnet50_to_resnet18_small.yaml"
GPT2 = "bench/recipes/kjv_gpt2_deep_to_shallow_small.yaml"
SETTINGS = {
    "resnet-trained": {"recipe": RESNET, "guide_epochs": 30, "guide_lr": 2e-3},
    "resnet-untrained": {"recipe": RESNET},
    "gpt2-deep-shallow": {"recipe": GPT2, "guide_epochs": 2, "guide_lr": 3e-3},
}


def run_setting(name: str, spec: dict, device: str, out_root: Path, seed: int | None = None) -> dict:
    recipe = only_baseline(load_recipe(ROOT / spec["recipe"]))
    checkpoint, guide = None, None
    if "guide_epochs" in spec:
        checkpoint, guide = cached_guide(name, recipe, spec["guide_epochs"], spec["guide_lr"], device)
    elif seed is not None:  # the same untrained guide for every seed
        checkpoint = untrained_guide(name, recipe)
    report = run_conversion(with_seed(recipe, seed), out_root / name, ConvertOptions(progress=bench_progress(), checkpoint=checkpoint, device=device, baseline=True, overwrite=True))
    m, plan = report["metric"], report["plan"]
    better = (m["target"] - m["baseline"]) if m["higher_is_better"] else (m["baseline"] - m["target"])
    return {
        "setting": name, "recipe": spec["recipe"], "metric": m["name"], "guide_trained": "guide_epochs" in spec,
        "guide": m["guide"], "not_aligned_only": m["target_after_alignment"], "not": m["target"], "naive": m["baseline"],
        "retention": m["retention"], "not_better_by": better, "pairs": [(p["target"], p["guide"]) for p in plan["pairs"]],
        "inherited": plan["inherited"], "params": report["params"], "flops": plan["flops"], "steps": report["steps"],
        "similarity_after_alignment": {k: v["cka"] for k, v in report["similarity"]["after_alignment"].items()},
        "guide_training": guide, "data": report["data"], "wall_time": report["wall_time"],
        "baseline_seconds": report["baseline"]["seconds"], "device": report["device"],
    }


def markdown(rows: list[dict], device: str) -> str:
    lines = ["| setting | metric | guide | NoT (aligned only) | NoT | from scratch | NoT better by | params guide → target | "
             "FLOPs guide → target | steps align + ft (= scratch) | wall s (conversion, scratch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = "{:.2f}" if r["metric"] == "perplexity" else "{:.4f}"
        guide = f.format(r["guide"]) + ("" if r["guide_trained"] else " (untrained)")
        lines.append(
            f"| {r['setting']} | {r['metric']} | {guide} | {pm(r, 'not_aligned_only', f)} | {pm(r, 'not', f)} | "
            f"{pm(r, 'naive', f)} | {pm(r, 'not_better_by', f)} | {r['params']['guide']:,} → {r['params']['target']:,} | "
            f"{r['flops']['guide']:,} → {r['flops']['target']:,} | {r['steps']['alignment']} + {r['steps']['finetune']} | "
            f"{r['wall_time']['total'] - r['baseline_seconds']:.0f}, {r['baseline_seconds']:.0f} |")
    return "\n".join(lines) + f"\n\nDevice: {device}.\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench-transfer")
    add_seeds_option(parser)
    args = parser.parse_args()
    run_settings(parser, args, SETTINGS, "architecture_transfer",
                 lambda name, spec, out, seed: run_setting(name, spec, args.device, out, seed), markdown)


if __name__ == "__main__":
    main()
