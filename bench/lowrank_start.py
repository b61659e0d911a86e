"""Where a low-rank factorisation starts: the plain truncated SVD of each weight (``init: svd``) against the SVD
weighted by the inputs the layer receives (``init: activation_svd``), before any training.

For a recipe whose rules factorise dense layers (``lowrank_linear``), every rule's ``rank_ratio`` is set to each of
``--ratios`` in turn and the guide's modules are all replaced at once, as ``convert`` builds them, then the hybrid's
test metric is measured with no alignment or fine-tuning. activation_svd draws its calibration inputs with each of
``--calibration-seeds`` (the ``calibration`` stream of the conversion seed); the plain SVD has no randomness. This is what the
alignment starts from, and what a user who factorises without training would get. Params and FLOPs per example are
counted on the hybrid (``theseus_cli.deploy.profile``).

Usage: python bench/lowrank_start.py [--settings minilm-ffn] [--ratios 0.25,0.5,0.75] [--calibration-seeds 0,1,2]
       [--device cpu] [--small]
Writes runs/bench-lowrank-start/lowrank_start.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import copy
import time

from common import (add_small_option, fmt_mean_std, merge, parse_seeds, run_settings, settings_parser, setting_raw,
                    smoke_note)

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.data import sample_batches
from theseus_cli.deploy.profile import profile_model
from theseus_cli.seeds import Seeds
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.tasks import get_task
from theseus_cli.training.loops import embed, evaluate
from theseus_cli.training.session import open_session

SETTINGS = {"minilm-ffn": {"recipe": "recipes/edge_minilm.yaml", "what": "all-MiniLM-L6-v2, the 12 feed-forward layers"}}
SMALL = {"data": {"train_limit": 64, "test_limit": 32, "eval_batch_size": 32}}


def hybrid_metric(session, raw: dict, ratio: float, init: str, seed: int) -> tuple[float, dict]:
    """The test metric of the guide with every rule's modules factorised at ``ratio`` from ``init``; its cost."""
    rules = [merge(r, {"params": {"rank_ratio": ratio, "init": init}}) if r["with"] == "lowrank_linear" else r
             for r in raw["replace"]]
    recipe = parse_recipe(merge(raw, {"replace": rules}), f"rank ratio {ratio}, init {init}")
    data, dev = session.data, session.device
    plan = build_plan(session.guide, recipe, data.x_train[:2].to(dev))
    hybrid = copy.deepcopy(session.guide)
    calibration = lambda n: sample_batches(data.x_train, n, recipe.data.eval_batch_size,  # noqa: E731
                                           Seeds(seed).generator("calibration"), dev)
    apply_entries(hybrid, plan.entries, calibration)
    value = evaluate(hybrid, get_task(recipe.task), data.x_test, data.y_test, recipe.data.eval_batch_size, dev)
    return value, {"params": plan.target_params, "flops": plan.target_flops}


def run_one(name: str, spec: dict, args) -> dict:
    started = time.perf_counter()
    raw = merge(setting_raw(spec), SMALL) if args.small else setting_raw(spec)
    session = open_session(parse_recipe(raw, spec["recipe"]), None, args.device if args.device != "auto" else "cpu")
    if session.recipe.task == "sentence-embedding":  # the reference embeddings: the test split's alone is needed
        data = session.data
        data.y_test = embed(session.guide, data.x_test, session.recipe.data.eval_batch_size, session.device)
    guide_metric = evaluate(session.guide, get_task(session.recipe.task), session.data.x_test, session.data.y_test,
                            session.recipe.data.eval_batch_size, session.device)
    cells = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        plain, cost = hybrid_metric(session, raw, ratio, "svd", 0)
        aware = [hybrid_metric(session, raw, ratio, "activation_svd", s)[0] for s in parse_seeds(args.calibration_seeds)]
        cells.append({"ratio": ratio, "svd": plain, "activation_svd": aware, **cost})
    return {"setting": name, "recipe": spec["recipe"], "what": spec["what"], "small": args.small,
            "metric_name": get_task(session.recipe.task).metric, "guide": guide_metric, "seeds": parse_seeds(args.calibration_seeds),
            "guide_params": profile_model(session.guide, session.data.x_test[:1], session.device, ())["params"],
            "cells": cells, "wall_time": {"total": time.perf_counter() - started}}


def markdown(rows: list, device: str) -> str:
    lines = []
    for r in rows:
        lines += [f"**{r['setting']}** ({r['recipe']}: {r['what']}) — {r['metric_name']} before any training; "
                  f"guide {r['guide']:.4f}, {r['guide_params']:,} params", "",
                  f"| rank ratio | params | FLOPs/example | init svd | init activation_svd (seeds {r['seeds']}) |",
                  "|---|---|---|---|---|"]
        for c in r["cells"]:
            lines.append(f"| {c['ratio']:g} | {c['params']:,} | {c['flops'] / 1e6:.0f}M | {c['svd']:.4f} | "
                         f"{fmt_mean_std(c['activation_svd'])} |")
        lines.append("")
    return "\n".join(lines) + f"\nDevice: {device}.{smoke_note(rows)}\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench-lowrank-start")
    parser.add_argument("--ratios", default="0.25,0.5,0.75", help="comma-separated rank ratios")
    parser.add_argument("--calibration-seeds", default="0,1,2", help="conversion seeds whose calibration draws "
                        "activation_svd measures on (one row per setting: no conversion runs)")
    add_small_option(parser)
    args = parser.parse_args()
    run_settings(parser, args, SETTINGS, "lowrank_start", lambda name, spec, out_root: run_one(name, spec, args), markdown)


if __name__ == "__main__":
    main()
