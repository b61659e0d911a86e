"""Guide vs target params, FLOPs per example and latency, for the converted models of the earlier benchmarks.

Params, FLOPs and latency depend on the architecture, not on the trained values of the
weights (every layer here is dense), so each pair is rebuilt from its recipe exactly as
``convert`` builds it — the guide, and the target after the recipe's replacements or the
target architecture of a transfer — with seeded weights, and measured with the same code as
``theseus eval`` and ``convert``'s report (:mod:`theseus_cli.deploy.profile`): FLOPs counted by
``torch.utils.flop_counter`` (plus recurrent layers), latency the median wall time of a
forward in PyTorch eager at batch 1 and batch 64, on one device, guide and target timed in one
process in alternating rounds (:func:`theseus_cli.deploy.profile.profile_pair`): each ratio is the median of
the per-round target/guide ratios, with their range. Quality figures for these pairs are in docs/BENCHMARKS.md's earlier sections.

Usage: python bench/deployment_cost.py [--settings ...] [--device cpu]
Writes runs/bench/deployment_cost.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import copy
import time

import torch
from common import ROOT, run_settings, settings_parser

from theseus_cli.models.build import build_model
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.deploy.profile import profile_pair
from theseus_cli.config.recipe import load_recipe
from theseus_cli.training.session import open_session
from theseus_cli.surgery.transfer import build_transfer_plan

SETTINGS = {
    "fmnist-resnet-to-mlp": {"recipe": "bench/recipes/fmnist_standard.yaml", "what": "ResNet-style CNN → MLP (low-rank Linear), 28×28"},
    "fmnist-canvas-resnet-to-mlp": {"recipe": "bench/recipes/fmnist_canvas_fewlabels.yaml", "what": "the same on the 40×40 canvas"},
    "resnet18-to-mlp": {"recipe": "recipes/resnet18_to_mlp.yaml", "what": "torchvision ResNet-18 → MLP, 3×32×32"},
    "resnet50-to-resnet18-small": {"recipe": "bench/recipes/fmnist_resnet50_to_resnet18_small.yaml",
                                   "what": "ResNet-50-style → ResNet-18-style (architecture transfer), 36×36"},
    "gpt2-attention-to-rnn": {"recipe": "recipes/gpt2_attention_to_rnn.yaml", "what": "GPT-2 (4 layers) attention → Elman RNN, 128 tokens"},
    "gpt2-8-to-4-blocks": {"recipe": "bench/recipes/kjv_gpt2_deep_to_shallow_small.yaml", "what": "GPT-2 8 → 4 blocks (architecture transfer)"},
    "minilm-attention-to-mlp": {"recipe": "recipes/minilm_attention_to_mlp.yaml", "what": "all-MiniLM-L6-v2 attention → token MLP"},
}


def pair(recipe_path: str):
    """(guide, target, one input example) as ``convert`` would build them, on the CPU."""
    recipe = load_recipe(ROOT / recipe_path)
    session = open_session(recipe, None, "cpu")
    guide = session.guide.eval()
    sample = session.data.x_test[:2]
    if recipe.target is None:
        plan = build_plan(guide, recipe, sample)
        target = copy.deepcopy(guide)
        apply_entries(target, plan.entries)
    else:
        target = build_model(recipe.target.arch, recipe.target.kwargs, recipe.seed + 1000, recipe.task)
        build_transfer_plan(guide, target, recipe, sample)
    return guide, target.eval(), sample[:1]


def run_one(name: str, spec: dict, device: str) -> dict:
    started = time.perf_counter()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    guide, target, sample = pair(spec["recipe"])
    timed = profile_pair(guide.to(dev), target.to(dev), sample, dev, (1, 64))  # in alternating rounds
    return {"setting": name, "recipe": spec["recipe"], "what": spec["what"], "guide": timed["guide"],
            "target": timed["target"], "ratios": timed["ratios"], "wall_time": {"total": time.perf_counter() - started}}


def _ratio(ratios: dict, batch: int) -> str:
    """``×1.83, ×1.80–1.88``: target time over guide time, median of the per-round ratios and their range."""
    lo, hi = ratios[f"latency_b{batch}_range"]
    return f"×{ratios[f'latency_b{batch}']:.2f}, ×{lo:.2f}–{hi:.2f}"


def markdown(rows: list, device: str) -> str:
    lines = ["| conversion | params guide → target | FLOPs/example guide → target | latency b=1 (ms) guide → target | "
             "latency b=64 (ms) guide → target |", "|---|---|---|---|---|"]
    for r in rows:
        g, t, q = r["guide"], r["target"], r["ratios"]
        lines.append(
            f"| {r['what']} | {g['params'] / 1e6:.2f}M → {t['params'] / 1e6:.2f}M (×{q['params']:.2f}) "
            f"| {g['flops_per_example'] / 1e6:.1f}M → {t['flops_per_example'] / 1e6:.1f}M (×{q['flops']:.2f}) "
            f"| {g['latency']['1']['median_ms']:.2f} → {t['latency']['1']['median_ms']:.2f} ({_ratio(q, 1)}) "
            f"| {g['latency']['64']['median_ms']:.1f} → {t['latency']['64']['median_ms']:.1f} ({_ratio(q, 64)}) |")
    return "\n".join(lines)


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench")
    args = parser.parse_args()
    run_settings(parser, args, SETTINGS, "deployment_cost",
                 lambda name, spec, out_root: run_one(name, spec, args.device), markdown)


if __name__ == "__main__":
    main()
