"""Alignment-stage throughput vs a plain training step of the same hybrid model, same batch, one run (issue #6).

The model is recipes/resnet18_to_mlp.yaml's target at its last progressive stage: torchvision ResNet-18
(3×32×32 inputs) with all 20 convolutions replaced by low-rank Linear layers. Measured, per batch size:

* alignment: ``theseus_cli.training.loops.align_stage`` on that stage — guide forward (no grad), hybrid forward,
  linear CKA at all 20 alignment points, backward, gradient clipping, AdamW — in samples/s;
* plain: ``theseus_cli.training.loops.train_task`` on the same hybrid — forward, cross-entropy, backward,
  clipping, AdamW — in samples/s;
* ratio = alignment / plain (the issue's goal: ≥ 0.7).

Both run under the recipe's runtime resolved for the device (bf16 autocast and channels_last on CUDA,
fp32 on CPU), on synthetic inputs already on the device (throughput does not depend on pixel values),
after warm-up steps; each figure is steps × batch / wall time with the device synchronised at the end.

Usage: python bench/gpu_alignment_throughput.py [--device cuda] [--batches 256,1024] [--steps 30] [--small]
Writes runs/bench-gpu/gpu_alignment_throughput.{json,md}; --small is a CPU smoke run (batch 8, 2 steps).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT, device_name

from theseus_cli.models.build import build_model
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.deploy.profile import synchronize
from theseus_cli.config.recipe import load_recipe
from theseus_cli.training.runtime import resolve_runtime, using
from theseus_cli.training.session import resolve_device
from theseus_cli.similarity import make_loss
from theseus_cli.tasks import get_task
from theseus_cli.training import AlignJob, TaskJob, align_stage, train_task

RECIPE = "recipes/resnet18_to_mlp.yaml"


def measure(batch: int, steps: int, warmup: int, dev: torch.device) -> dict:
    recipe = load_recipe(ROOT / RECIPE)
    rt = resolve_runtime(recipe.runtime, dev)
    guide = rt.prepare(build_model(recipe.guide.arch, recipe.guide.kwargs, 0).to(dev)).eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch * (steps + warmup), 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (x.shape[0],), device=dev)
    plan = build_plan(guide, recipe, x[:2])
    target = copy.deepcopy(guide)
    apply_entries(target, plan.entries)
    stage = plan.stages[-1]  # progressive: every replacement trained, every point aligned
    loss_fn = make_loss("cka")
    out = {"batch": batch, "steps": steps, "runtime": rt.summary(), "aligned_points": len(stage.aligned)}
    with using(rt):
        for label, run in (
            ("alignment", lambda n: align_stage(0, guide, target, stage, x[: batch * n], AlignJob(recipe.align.model_copy(
                update={"epochs": 1, "max_steps_per_epoch": n}), loss_fn, batch, torch.Generator().manual_seed(0), dev))),
            ("plain", lambda n: train_task(target, get_task("classification"), x[: batch * n], y[: batch * n], TaskJob(n, 1e-3, 0.0,
                                           0, 1.0, 0.0, batch, torch.Generator().manual_seed(0), dev, "plain"))),
        ):
            run(warmup)
            synchronize(dev)
            start = time.perf_counter()
            run(steps)
            synchronize(dev)
            out[label] = steps * batch / (time.perf_counter() - start)
    out["ratio"] = out["alignment"] / out["plain"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: batch 8, 2 steps")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-gpu"))
    args = parser.parse_args()
    dev = resolve_device(args.device)
    batches = [8] if args.small else [int(b) for b in args.batches.split(",")]
    steps, warmup = (2, 1) if args.small else (args.steps, 5)
    rows = []
    for b in batches:
        rows.append(measure(b, steps, warmup, dev))
        print(f"batch {b}: ratio {rows[-1]['ratio']:.3f}", file=sys.stderr, flush=True)
    name = device_name(str(dev))
    lines = ["| batch | alignment samples/s | plain training samples/s | ratio | runtime |", "|---|---|---|---|---|"]
    for r in rows:
        rt = r["runtime"]
        lines.append(f"| {r['batch']} | {r['alignment']:,.0f} | {r['plain']:,.0f} | {r['ratio']:.3f} | "
                     f"{'bf16' if rt['bf16'] else 'fp32'}{', channels_last' if rt['channels_last'] else ''} |")
    table = "\n".join(lines) + f"\n\nDevice: {name}." + (" SMOKE RUN (--small)." if args.small else "") + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "device": name, "command": " ".join(sys.argv), "rows": rows}
    (out / "gpu_alignment_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_alignment_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
