"""The paper's orderings at small scale, in one run: schedules (Table 2), trained vs untrained guide vs naive
(Table 3), and CKA vs unbiased CKA vs D-MNN — CNN → MLP on few-label, randomly placed Fashion-MNIST.

Every variant starts from the same recipe (bench/recipes/fmnist_small_canvas.yaml), the same trained guide
(cached) and the same seed; only the named setting changes. Alignment budgets are equal: `joint` has one
stage, so it gets as many epochs as the progressive schedule has stages. The naive baseline is trained once,
for the progressive run's total number of steps.

Usage: python bench/fmnist_schedules.py [--device auto]
Writes runs/bench-schedules/fmnist_schedules.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from common import bench_progress, ROOT, cached_guide, device_name, only_baseline

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import load_recipe, parse_recipe

RECIPE = "bench/recipes/fmnist_small_canvas.yaml"
N_STAGES = 9  # convs of the guide: one stage each under progressive / sequential / independent

VARIANTS = [  # (name, recipe changes, untrained guide, with baseline)
    ("progressive · CKA", {}, False, True),
    ("joint · CKA", {"schedule": {"kind": "joint"}, "align": {"epochs": N_STAGES}}, False, False),
    ("independent · CKA", {"schedule": {"kind": "independent"}}, False, False),
    ("sequential · CKA", {"schedule": {"kind": "sequential"}}, False, False),
    ("progressive reverse · CKA", {"schedule": {"order": "reverse"}}, False, False),
    ("progressive · unbiased CKA", {"similarity": {"kind": "ucka"}}, False, False),
    ("progressive · D-MNN (k=10, τ=0.1)", {"similarity": {"kind": "dmnn", "k": 10, "tau": 0.1}}, False, False),
    ("progressive · CKA · untrained guide", {}, True, False),
]


def merged(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-schedules"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = only_baseline(load_recipe(ROOT / RECIPE))
    guide, guide_info = cached_guide("small-canvas", base, 30, 2e-3, args.device)
    rows, naive = [], None
    for i, (name, changes, untrained, with_baseline) in enumerate(VARIANTS):
        recipe = parse_recipe(merged(base.resolved(), changes), f"{RECIPE} + {changes}")
        report = run_conversion(recipe, out / f"v{i}", ConvertOptions(progress=bench_progress(), checkpoint=None if untrained else guide, device=args.device,
                                baseline=with_baseline, overwrite=True))
        acc = report["metric"]
        if with_baseline:
            naive = {"accuracy": acc["baseline"], "steps": report["steps"]["baseline"]}
            guide_acc = acc["guide"]
        rows.append({"variant": name, "changes": changes, "guide_trained": not untrained, "guide": acc["guide"],
                     "not": acc["target"], "steps": report["steps"], "wall_s": report["wall_time"]["total"],
                     "cka_after_alignment": {p: v["cka"] for p, v in report["similarity"]["after_alignment"].items()}})
        print(f"{name}: {acc['target']:.4f}", file=sys.stderr, flush=True)
    lines = ["| variant | NoT acc | NoT − naive | retention (NoT / trained guide) | align + ft steps | mean held-out CKA after alignment |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mean_cka = sum(r["cka_after_alignment"].values()) / len(r["cka_after_alignment"])
        lines.append(f"| {r['variant']} | {r['not']:.4f} | {r['not'] - naive['accuracy']:+.4f} | {r['not'] / guide_acc:.3f} | "
                     f"{r['steps']['alignment']} + {r['steps']['finetune']} | {mean_cka:.3f} |")
    lines.append(f"| naive baseline (same target, from scratch) | {naive['accuracy']:.4f} | — | {naive['accuracy'] / guide_acc:.3f} | {naive['steps']} | — |")
    dev = device_name(args.device)
    table = "\n".join(lines) + f"\n\nTrained guide: {guide_acc:.4f}. Untrained guide's own accuracy: {rows[-1]['guide']:.4f}. Device: {dev}.\n"
    result = {"date": datetime.date.today().isoformat(), "device": dev, "command": " ".join(sys.argv), "guide": guide_info,
              "trained_guide_accuracy": guide_acc, "naive": naive, "rows": rows}
    (out / "fmnist_schedules.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "fmnist_schedules.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
