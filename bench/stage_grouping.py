"""Stage grouping on a CNN with many convolutions (issue 19): is one stage per replaced module (the paper's schedule,
theseus's default) worth its cost against ``schedule.group_depth``, and should grouping become the default?

The CNN is torchvision's MobileNetV3-small (52 convolutions), trained once (10 epochs, all 12,000 labels) on the
canvas data (Fashion-MNIST at random places on a 32×32 canvas, 3 channels) and converted in the few-label setting
(1,000 labels, 12,000 unlabelled inputs); its 39 dense 1×1
convolutions become low-rank ones (bench/recipes/mobilenetv3_lowrank_many_stages.yaml). Per conversion seed, three
conversions of the same recipe on the same guide:

* ``per-module`` — the default: 39 progressive stages, the recipe's steps per stage; the target from scratch and
  distilled from the guide (``baseline.runs: [scratch, distill]``) run beside it for its total gradient steps, at
  the seeds of ``--baseline-seeds`` only (default: the first seed; labelled so in the table): on this CPU each
  baseline trains the whole network for ~1,370 steps, ~11 minutes, 8× the conversion's alignment;
* ``grouped`` — ``group_depth: 2`` (one stage per inverted-residual block: 11), the same steps per stage, so
  about 11/39 of the alignment's steps: what a user gets by flipping the switch;
* ``grouped-equal-steps`` — ``group_depth: 2`` with as many alignment steps as ``per-module`` in total (steps per
  stage raised), so that the schedule is compared at an equal budget and against the same baselines.

Reported: stages, alignment steps, alignment seconds, test accuracy (mean ± std over seeds), retention.

Usage: python bench/stage_grouping.py [--seeds 0,1,2] [--baseline-seeds 0] [--device auto] [--small]
Writes runs/bench-grouping/stage_grouping.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from common import (bench_progress, ROOT, add_seeds_option, add_small_option, cached_guide, finished_report, fmt_mean_std, merge,
                    parse_seeds, pm, run_settings, settings_parser, smoke_note)

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.data.core import batches_per_epoch
from theseus_cli.pipelines.inspect import inspect_guide

RECIPE = "bench/recipes/mobilenetv3_lowrank_many_stages.yaml"
GUIDE_EPOCHS, GUIDE_LR = 10, 2e-3
SETTINGS = {"mobilenetv3-small": {"recipe": RECIPE}}
VARIANTS = ("per-module", "grouped", "grouped-equal-steps")
SMALL = {"data": {"train_limit": 128, "label_limit": 16, "test_limit": 32, "batch_size": 8},
         "align": {"epochs": 1, "max_steps_per_epoch": 1}, "finetune": {"epochs": 1}, "bn_recalibration": {"batches": 2}}


def equal_budget(raw: dict, per_module_steps: int, stages: int) -> dict:
    """``align`` settings giving ``stages`` stages about ``per_module_steps`` alignment steps in all: as many epochs
    as the training split needs, each capped at an equal share (so the total is within one step per stage)."""
    per_stage = per_module_steps / stages
    data = raw["data"]
    per_epoch = batches_per_epoch(data["train_limit"], min(data["batch_size"], data["train_limit"]))
    epochs = max(1, math.ceil(per_stage / per_epoch))
    return {"epochs": epochs, "max_steps_per_epoch": max(1, round(per_stage / epochs))}


def variant_recipes(seed: int, small: bool, baselines: bool = True) -> dict[str, dict]:
    """The three variants' raw recipes for one conversion seed (data subsets at seed 0, like the guide's)."""
    raw = merge(yaml.safe_load((ROOT / RECIPE).read_text()), {"seed": seed, "data": {"seed": 0}})
    if small:
        raw = merge(raw, SMALL)
    grouped = merge(raw, {"schedule": {"group_depth": 2}})
    per_module_cost = inspect_guide(parse_recipe(raw, RECIPE))["cost"]
    grouped_stages = inspect_guide(parse_recipe(grouped, RECIPE))["cost"]["stages"]
    return {"per-module": merge(raw, {"baseline": {"runs": ["scratch", "distill"]}}) if baselines else raw,
            "grouped": grouped,
            "grouped-equal-steps": merge(grouped, {"align": equal_budget(raw, per_module_cost["align_steps"], grouped_stages)})}


def guide_recipe(raw: dict) -> dict:
    """The guide is trained on every training image with its label (``train-guide`` trains on the labelled subset):
    the guide a user brings was trained on all the labels there were; the few labels are the conversion's setting.
    A MobileNetV3 trained on the 1,000 labels alone stays near chance (its BatchNorm momentum is 0.01: 120 steps do
    not even settle the running statistics)."""
    return merge(raw, {"seed": 0, "data": {"label_limit": None}})


def run_one(name: str, spec: dict, out_root: Path, seed: int, device: str = "auto", small: bool = False,
            baselines: bool = True) -> dict:
    raws = variant_recipes(seed, small, baselines)
    guide, _ = cached_guide("grouping-mnv3s", parse_recipe(guide_recipe(raws["grouped"]), RECIPE),
                            1 if small else GUIDE_EPOCHS, GUIDE_LR, device)
    row: dict = {"setting": name, "recipe": RECIPE, "small": small}
    total = 0.0
    for variant in VARIANTS:
        run, recipe = out_root / variant, parse_recipe(raws[variant], f"{variant} seed {seed}")
        resume = (run / ".resume").is_dir()  # a killed run goes on from its last finished stage
        report = finished_report(run, recipe.digest(), guide) or run_conversion(
            recipe, run, ConvertOptions(progress=bench_progress(), checkpoint=guide, device=device, baseline=baselines and variant == "per-module",
                                        overwrite=not resume, resume=resume, latency=False))
        m = report["metric"]
        row["guide"], row["data"] = m["guide"], report["data"]
        row.update({f"{variant}_acc": m["target"], f"{variant}_retention": m["retention"],
                    f"{variant}_stages": len(report["stages"]), f"{variant}_align_steps": report["steps"]["alignment"],
                    f"{variant}_steps": report["steps"]["alignment"] + report["steps"]["finetune"],
                    f"{variant}_align_s": report["wall_time"]["alignment"]})
        if baselines and variant == "per-module":  # nested: seed aggregation averages top-level numbers only
            row["baselines"] = {b: {"seed": seed, "metric": m["baselines"][b], "steps": report["baselines"][b]["steps"],
                                    "seconds": report["baselines"][b]["seconds"]} for b in ("scratch", "distill")}
        total += report["wall_time"]["total"]
    row["wall_time"] = {"total": total}
    return row


def figure_ratio(values: list[float], guide: float) -> str:
    return f"{sum(values) / len(values) / guide:.3f}"


def markdown(rows: list, device: str) -> str:
    lines = []
    for r in rows:
        lines += [f"**{r['setting']}** ({r['recipe']}); {r['data']['train']:,} training inputs, "
                  f"{r['data']['labelled']:,} labelled; guide accuracy {r['guide']:.4f}", "",
                  "| run | stages | alignment steps | alignment s | total steps | accuracy | retention |",
                  "|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            lines.append(f"| {v} | {r[f'{v}_stages']:.0f} | {r[f'{v}_align_steps']:,.0f} | {pm(r, f'{v}_align_s', '{:.0f}')} | "
                         f"{r[f'{v}_steps']:,.0f} | {pm(r, f'{v}_acc')} | {pm(r, f'{v}_retention', '{:.3f}')} |")
        runs = [row["baselines"] for row in r.get("per_seed", [r]) if "baselines" in row]
        for b, label in (("scratch", "target from scratch"), ("distill", "target distilled from the guide")):
            values = [x[b]["metric"] for x in runs]
            seeds = ", ".join(str(x[b]["seed"]) for x in runs)
            figure = fmt_mean_std(values) if len(values) > 1 else f"{values[0]:.4f} (seed {seeds} only)"
            lines.append(f"| {label} | — | — | {runs[0][b]['seconds']:.0f} (training) | {runs[0][b]['steps']:,.0f} | "
                         f"{figure} | {figure_ratio(values, r['guide'])} |")
        lines.append("")
    return "\n".join(lines) + f"\nDevice: {device}.{smoke_note(rows)}\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench-grouping")
    add_seeds_option(parser)
    add_small_option(parser)
    parser.add_argument("--baseline-seeds", default=None, help="seeds that also train the baselines (default: the first)")
    args = parser.parse_args()
    with_baselines = parse_seeds(args.baseline_seeds) if args.baseline_seeds else parse_seeds(args.seeds)[:1]
    run_settings(parser, args, SETTINGS, "stage_grouping",
                 lambda name, spec, out, seed: run_one(name, spec, out, seed, args.device, args.small,
                                                       seed in with_baselines), markdown)


if __name__ == "__main__":
    main()
