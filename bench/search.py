"""Goal-driven conversion: does ``theseus search`` find a target at least as good as the hand-written edge recipe,
and as the same architecture distilled, under a latency budget on ONNX Runtime? One run per family.

For each setting (a family: the CNN, the encoder, the decoder), in one run:

1. the setting's guide (bench/edge.py's, cached; ResNet-18's trained without the labels the search holds out to
   rank on, as ``theseus train-guide --recipe SEARCH.yaml`` trains it) and its hand-written edge recipe as the
   search's **base** (the incumbent where the space holds it);
2. ``theseus search`` (library call, ``--device`` as given) over the setting's space with the goal
   ``max_latency_ratio: 0.5`` (at most half the guide's ONNX Runtime fp32 batch-1 latency, one thread, timed
   alternating with the guide) — the winner, the search's cost in full-conversion equivalents, its phase-1
   latency, or, where no candidate meets the goal, the nearest one;
3. for each seed (``--seeds``): the winner's recipe at the full budget on all the training data, with the same
   architecture from scratch and distilled from the guide at equal steps (``baseline.runs: [scratch, distill]``),
   and the hand-written edge recipe; the test metric of each, and the ONNX Runtime batch-1 latency of the
   winner's and the hand-written target's fp32 and int8 files against the guide's fp32 file, all five files timed
   in one interleaved run (:func:`common.onnx_speedups`'s machinery: ratios are medians of per-round ratios).

Usage: python bench/search.py [--settings resnet18,...] [--seeds 0,1,2] [--device cpu] [--small]
Writes runs/bench-search/search.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from common import (add_seeds_option, add_small_option, bench_progress, finished_report, merge, pm, run_settings,
                    settings_parser, smoke_note)
from edge import SETTINGS as EDGE, guide_as_target, on_onnxruntime, raw_recipe, the_guide

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.config.search import load_search
from theseus_cli.deploy.interleave import latency_budget, pair_ratio
from theseus_cli.deploy.onnx_runtime import onnx_latency_pair, open_onnx
from theseus_cli.errors import GateError
from theseus_cli.pipelines.search import SearchOptions, run_search
from theseus_cli.training.session import open_session

GOALS = {"max_latency_ratio": 0.5, "runtime": {"batch": 1, "threads": 1, "precision": "fp32"}}
METHODS = [{"method": "not", "similarity": ["mse"]}, {"method": "not-teacher", "similarity": ["mse"]},
           "progressive-distill", "distill"]
SETTINGS = {
    # ResNet-18 on the few-label canvas: each half of the network (layer1–2, layer3–4) keeps its 3×3 convolutions,
    # makes them depthwise-separable, or low-rank at a quarter of the rank from their SVD: 8 architectures
    "resnet18": {"edge": "resnet18-separable-kd", "space": {
        "rules": [{"match": "re:layer\\d\\.\\d\\.conv\\d", "groups": {"depth": 1, "size": 2},
                   "with": ["keep", "separable_conv", {"with": "lowrank_conv", "params": {"rank_ratio": 0.25, "init": "svd"}}]}],
        "methods": METHODS},
        "budget": {"min_fraction": 0.125, "reduction_factor": 8, "max_cost": 4},
        # the guide trains on the 1,000 labels less the 200 the search ranks on (train-guide on the search file): a
        # guide that memorised the validation labels makes the ranking reward imitating it
        "guide_holds_out": True},
    # all-MiniLM-L6-v2 on 8,000 sentences: blocks 0–2 and 3–5 each keep their feed-forward layers or take them at half
    # or a quarter of the rank (activation-weighted SVD); progressive distillation does not apply to embeddings
    "minilm": {"edge": "minilm-edge", "space": {
        "rules": [{"match": "re:encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense", "groups": {"depth": 3, "size": 3},
                   "with": ["keep", {"with": "lowrank_linear", "params": {"rank_ratio": [0.5, 0.25], "init": "activation_svd"}}]}],
        "methods": [{"method": "not", "similarity": ["mse"]}, "distill"]},
        "budget": {"min_fraction": 0.25, "reduction_factor": 4, "max_cost": 4}},
    # the CPU-sized GPT-2 (4 blocks) on 1,000 sequences: each block kept or dropped (identity), attention kept or
    # linear (hedgehog) in all blocks
    "gpt2-cpu": {"edge": "gpt2-edge-1000-cpu", "space": {
        "rules": [{"match": "re:transformer\\.h\\.\\d+", "groups": {"depth": 3}, "with": ["keep", "identity"]},
                  {"match": "GPT2Attention", "align_up": 1, "with": ["keep", {"with": "linear_attention",
                                                                              "params": {"feature_map": "hedgehog"}}]}],
        # guide-init-distill: what this setting measured on 2026-12-06 as "distill", before distill started fresh
        "methods": [{"method": "not", "similarity": ["cka"]}, "progressive-distill", "guide-init-distill"]},
        "budget": {"min_fraction": 0.25, "reduction_factor": 4, "max_cost": 4}},
}
SMALL_BUDGET = {"min_fraction": 0.5, "reduction_factor": 2, "max_cost": 3}


def write_search(name: str, spec: dict, out: Path, small: bool) -> tuple[Path, dict]:
    """The base recipe (the hand-written edge recipe, data seed 0, no baselines) and the search file, in ``out``."""
    espec = EDGE[spec["edge"]]
    raw = merge(raw_recipe(espec, 0, small), {"baseline": {"enabled": False}})
    out.mkdir(parents=True, exist_ok=True)
    (out / "base.yaml").write_text(yaml.safe_dump(raw))
    search = {"base": "base.yaml", "space": spec["space"], "goals": GOALS,
              "budget": SMALL_BUDGET if small else spec["budget"], "validation": {"size": 64 if small else 1000}}
    (out / "search.yaml").write_text(yaml.safe_dump(search))
    return out / "search.yaml", raw


def search_guide(spec: dict, raw: dict, search_path: Path, device: str, small: bool) -> Path | None:
    """The setting's guide: bench/edge.py's, or (``guide_holds_out``) the same trained without the labels the search
    holds out to rank its trials, as ``theseus train-guide --recipe SEARCH.yaml`` trains it."""
    hold_out = load_search(search_path)[0].validation if spec.get("guide_holds_out") else None
    return the_guide(spec["edge"], EDGE[spec["edge"]], raw, device, small, hold_out=hold_out)


def searched(name: str, spec: dict, out: Path, device: str, small: bool) -> dict:
    path, raw = write_search(name, spec, out, small)
    guide = search_guide(spec, raw, path, device, small)
    run = out / "search"
    try:
        result = run_search(path, run, SearchOptions(checkpoint=guide, device=device, resume=(run / ".search.json").is_file(),
                                                     progress=bench_progress()))
        feasible = True
    except GateError as exc:  # no feasible candidate; or a winner whose final file missed a goal when measured again
        result = json.loads((run / "search.json").read_text())
        feasible = result["state"] == "finished"
        result["gate_error"] = str(exc)
    return {"guide": guide, "raw": raw, "result": result, "feasible": feasible, "dir": run}


def final_runs(found: dict, espec: dict, out: Path, seed: int, device: str, small: bool) -> dict:
    """The winner's recipe (all training data, full budget) with both baselines, and the hand-written recipe."""
    guide, row = found["guide"], {}
    best = json.loads((found["dir"] / "best" / "report.json").read_text())
    if "recipe" in best:
        raw = merge(best["recipe"], {"seed": seed, "data": {"seed": 0},
                                     "baseline": {"enabled": True, "runs": ["scratch", "distill"]}})
        recipe = parse_recipe(raw, f"winner seed {seed}")
        run = out / "winner"
        report = finished_report(run, recipe.digest(), guide) or run_conversion(recipe, run, ConvertOptions(
            checkpoint=guide, device=device, baseline=True, overwrite=True, progress=bench_progress(), latency=False))
        m = report["metric"]
        row.update(winner=m["target"], scratch=m["baselines"]["scratch"], distill=m["baselines"]["distill"],
                   guide=m["guide"], steps=report["steps"]["alignment"] + report["steps"]["finetune"],
                   winner_params=report["params"]["target"], winner_run=run)
    hand = parse_recipe(merge(raw_recipe(espec, seed, small), {"baseline": {"enabled": False}}), f"hand seed {seed}")
    run = out / "hand"
    report = finished_report(run, hand.digest(), guide) or run_conversion(hand, run, ConvertOptions(
        checkpoint=guide, device=device, overwrite=True, progress=bench_progress(), latency=False))
    row.update(hand=report["metric"]["target"], hand_run=run, guide=report["metric"]["guide"],
               hand_steps=report["steps"]["alignment"] + report["steps"]["finetune"])
    return row


def timed(found: dict, row: dict, out: Path) -> dict:
    """The guide's, the winner's and the hand-written target's ONNX files in one interleaved run at batch 1."""
    files = {}
    onnx_g = on_onnxruntime(guide_as_target(found["raw"], found["guide"], out / "guide"), out / "guide" / "onnx")
    files["guide_fp32"] = onnx_g["fp32"]["path"]
    for who in ("winner", "hand"):
        if f"{who}_run" in row:
            for kind, res in on_onnxruntime(row.pop(f"{who}_run"), out / who / "onnx").items():
                if "path" in res:
                    files[f"{who}_{kind}"] = res["path"]
                    row[f"{who}_{kind}_metric"] = res["metric"]
                    row[f"{who}_{kind}_mb"] = res["size_bytes"] / 1e6
    sample = open_session(parse_recipe(found["raw"], "timing"), found["guide"], "cpu", probe=False).data.x_test[:1]
    res = onnx_latency_pair({n: open_onnx(p, 1) for n, p in files.items()}, sample, (1,),
                            budget_s=5 * latency_budget() * len(files))
    rounds = res["round_medians_ms"]["1"]
    for name in files:
        row[f"{name}_ms"] = res["latency"][name]["1"]["median_ms"]
        if name != "guide_fp32":
            r = pair_ratio(rounds, "guide_fp32", name)  # guide time / this file's time
            row[f"ratio_{name}"], row[f"ratio_{name}_min"], row[f"ratio_{name}_max"] = 1 / r["median"], 1 / r["max"], 1 / r["min"]
    return row


def run_one(name: str, spec: dict, out_root: Path, seed: int, device: str, small: bool, cache: dict) -> dict:
    if name not in cache:  # the search runs once per setting, before the first seed's final runs
        cache[name] = searched(name, spec, out_root / name, device, small)
    found = cache[name]
    result = found["result"]
    row = {"setting": name, "small": small, "feasible": found["feasible"], "metric_name": result["metric"],
           "winner_label": result.get("winner", {}).get("label"), "nearest": (result.get("nearest") or {}).get("label"),
           "search_cost": (result.get("cost") or {}).get("full_conversion_equivalents"),
           "search_cost_nominal": (result.get("cost") or {}).get("nominal"),
           "phase1_latency_ms": (result.get("best") or {}).get("phase1_latency_ms"),
           "final_latency_ms": ((result.get("best") or {}).get("final") or {}).get("latency_ms"),
           "search_spearman": (result.get("ranking") or {}).get("spearman"),
           "winner_gates": (result.get("best") or {}).get("gates"), "choice": result.get("choice"),
           "validation": result.get("validation"),
           "phase1": {k: result["phase1"][k] for k in ("architectures", "feasible", "dropped", "seconds")},
           "trials": len(result.get("trials", [])), "search_seconds": result.get("wall_seconds"),
           "wall_time": {"total": result.get("wall_seconds") or 0.0}}
    if found["feasible"]:
        seed_dir = out_root / name / f"seed{seed}"
        row.update(final_runs(found, EDGE[spec["edge"]], seed_dir, seed, device, small))
        row = timed(found, row, seed_dir)
    return row


def markdown(rows: list, device: str) -> str:
    lines = [f"Device: {device}.{smoke_note(rows)}", "",
             "| setting | winner | test metric: winner / hand-written / same arch distilled / from scratch / guide "
             "| winner latency ÷ guide (fp32) | hand-written ÷ guide | search cost | phase-1 / final ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["feasible"]:
            lines.append(f"| {r['setting']} | none meets the goal; nearest: {_cell(r['nearest'])} | | | | "
                         f"{_n(r['search_cost'])} | |")
            continue
        metrics = " / ".join(pm(r, k) for k in ("winner", "hand", "distill", "scratch", "guide") if k in r)
        lines.append(f"| {r['setting']} | {_cell(r['winner_label'])} | {metrics} | {_ratio(r, 'winner_fp32')} | "
                     f"{_ratio(r, 'hand_fp32')} | {_n(r['search_cost'])} | {_n(r['phase1_latency_ms'], '.3g')} / "
                     f"{_n(r['final_latency_ms'], '.3g')} |")
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    """A label in a table cell: its ' | ' (architecture | method) would split the cell."""
    return str(text).replace("|", "\\|")


def _n(value, fmt: str = ".2f") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _ratio(r: dict, name: str) -> str:
    key = f"ratio_{name}"
    if key not in r:
        return "—"
    return f"×{r[key]:.3g} (×{r[key + '_min']:.3g}–{r[key + '_max']:.3g})"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench-search")
    add_seeds_option(parser)
    add_small_option(parser)
    args = parser.parse_args()
    cache: dict = {}
    run_settings(parser, args, SETTINGS, "search",
                 lambda name, spec, out, seed: run_one(name, spec, out.parent, seed, args.device, args.small, cache),
                 markdown)


if __name__ == "__main__":
    main()
