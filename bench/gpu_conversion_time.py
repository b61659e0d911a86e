"""Wall time of a complete ResNet-18 → MLP conversion, and how it grows with stages and batch size (issue #6).

* ``full`` — recipes/resnet18_to_mlp.yaml on all 60k Fashion-MNIST training images (3×32×32): the guide
  (torchvision ResNet-18) is trained here (cached under .cache/bench), then converted — every one of the
  20 convolutions → low-rank Linear, progressive CKA alignment, BatchNorm recalibration, fine-tuning — and
  the wall time, the guide's and the target's test accuracy and the retention are reported (issue goal:
  under 10 minutes on one H100, retention ≥ 0.95).
* ``scaling`` — alignment wall time of the same conversion with 1 (joint), 5 (the stem and one per ResNet
  layer, ``group_depth: 1``) and 20 stages, at two batch sizes, each with the same number of alignment
  steps per stage (``--scaling-steps``), from the untrained guide (time does not depend on the weights).

Everything runs under the recipe's runtime resolved for the device (bf16 autocast, channels_last and
data on the device on CUDA). ``--small`` is a CPU smoke run on a few hundred images; its figures mean nothing.

Usage: python bench/gpu_conversion_time.py [--device cuda] [--parts full,scaling] [--small]
Writes runs/bench-gpu/gpu_conversion_time.{json,md} and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from common import bench_progress, ROOT, cached_guide, device_name

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import load_recipe, parse_recipe

RECIPE = "recipes/resnet18_to_mlp.yaml"
SMALL = {"data": {"train_limit": 96, "test_limit": 48, "batch_size": 16},
         "replace": [{"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 8}}],
         "align": {"max_steps_per_epoch": 1, "epochs": 1}, "finetune": {"epochs": 1}, "bn_recalibration": {"batches": 2}}


def _recipe(changes: dict, small: bool):
    data = load_recipe(ROOT / RECIPE).resolved()
    for extra in ([SMALL] if small else []) + [changes]:
        for section, values in extra.items():
            data[section] = {**data[section], **values} if isinstance(values, dict) else values
    return parse_recipe(data, RECIPE)


def full(device: str, out: Path, small: bool) -> dict:
    recipe = _recipe({}, small)
    guide, info = cached_guide("resnet18-fmnist32", recipe, 1 if small else 8, 1e-3, device)
    report = run_conversion(recipe, out / "full", ConvertOptions(progress=bench_progress(), checkpoint=guide, device=device, overwrite=True,
                                                                 latency=not small))
    m = report["metric"]
    return {"guide_training": info, "guide": m["guide"], "target": m["target"], "retention": m["retention"],
            "stages": len(report["stages"]), "steps": report["steps"], "wall_time": report["wall_time"],
            "finetune_seconds": report["finetune"]["seconds"], "runtime": report["runtime"], "data": report["data"]}


def scaling(device: str, out: Path, small: bool, steps: int, batches: list[int]) -> list[dict]:
    rows = []
    for label, schedule in (("joint (1 stage)", {"kind": "joint"}), ("per ResNet layer", {"group_depth": 1}),
                            ("per convolution (20 stages)", {})):
        for batch in batches:
            recipe = _recipe({"schedule": schedule, "data": {"batch_size": batch},
                              "align": {"epochs": 1, "max_steps_per_epoch": steps, "batch_size": batch},
                              "finetune": {"epochs": 0}}, small)
            report = run_conversion(recipe, out / "scaling", ConvertOptions(progress=bench_progress(), device=device, overwrite=True,
                                                                            latency=False))  # alignment time only
            rows.append({"schedule": label, "batch": batch, "stages": len(report["stages"]),
                         "steps": report["steps"]["alignment"], "alignment_seconds": report["wall_time"]["alignment"]})
            print(f"{label}, batch {batch}: {rows[-1]['alignment_seconds']:.1f}s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parts", default="full,scaling")
    parser.add_argument("--scaling-steps", type=int, default=50)
    parser.add_argument("--scaling-batches", default="256,1024")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-gpu"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    result = {"date": datetime.date.today().isoformat(), "device": device_name(args.device), "command": " ".join(sys.argv)}
    lines = []
    if "full" in parts:
        r = result["full"] = full(args.device, out, args.small)
        lines += ["| conversion | stages | steps align + ft | wall s (alignment, total) | guide acc | target acc | retention |",
                  "|---|---|---|---|---|---|---|",
                  f"| ResNet-18 → MLP, {r['data']['train']} images | {r['stages']} | {r['steps']['alignment']} + "
                  f"{r['steps']['finetune']} | {r['wall_time']['alignment']:.0f}, {r['wall_time']['total']:.0f} | "
                  f"{r['guide']:.4f} | {r['target']:.4f} | {r['retention']:.3f} |", ""]
    if "scaling" in parts:
        steps, batches = (1, [16, 32]) if args.small else (args.scaling_steps, [int(b) for b in args.scaling_batches.split(",")])
        rows = result["scaling"] = scaling(args.device, out, args.small, steps, batches)
        lines += ["| schedule | stages | batch | alignment steps | alignment wall s | ms / step |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['schedule']} | {r['stages']} | {r['batch']} | {r['steps']} | {r['alignment_seconds']:.1f} | "
                  f"{1000 * r['alignment_seconds'] / max(1, r['steps']):.0f} |" for r in rows]
    table = "\n".join(lines) + f"\n\nDevice: {result['device']}." + (" SMOKE RUN (--small)." if args.small else "") + "\n"
    (out / "gpu_conversion_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_conversion_time.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
