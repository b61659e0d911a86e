"""Edge conversions: what a compressive target is worth on the runtime an edge device uses, against its guide and
against what a user would do instead (the same target from scratch, or distilled from the guide), in one run.

For each setting and conversion seed (``--seeds``; the guide is trained once with seed 0 and cached):

1. ``theseus convert`` with ``baseline.runs: [scratch, distill]`` — NoT, the target from scratch, the target
   distilled from the guide on all training inputs, each for the conversion's gradient steps (issue #16);
2. the guide and the NoT target exported to ONNX (the parity-checked float file) and to int8
   (``export --quantize int8``: static QDQ for convolutional graphs, dynamic otherwise, written only if the test
   metric stays within ``--max-metric-drop``; a refusal is reported as such);
3. every file run by ONNX Runtime's CPU provider with one intra-op thread (an edge core): the test metric, and the
   batch-1 latency: the four files (guide and target, fp32 and int8) timed in one process in alternating rounds
   (:mod:`theseus_cli.deploy.interleave`), each speed-up the median of the per-round ratios, with their range.

Params and FLOPs per example come from the conversion's report (``torch.utils.flop_counter``); PyTorch eager
latency too. The goal the issue sets: a target ≥ 2× faster than its guide on ONNX Runtime at batch 1 (int8
allowed) with ≥ 97 % retention, beating both from-scratch and distillation — the verdict line says per setting
whether it is met.

Settings (CPU by default; ``"default": False`` ones need a GPU-sized budget):
* ``cnn-separable`` / ``cnn-lowrank-svd`` / ``cnn-lowrank-random`` — recipes/edge_cnn_*.yaml: the demo's
  ResNet-style CNN on the few-label canvas data → depthwise-separable / low-rank (SVD start; random start)
  convolutions, aligned with feature regression (``similarity.kind: mse``); ``cnn-separable-cka`` /
  ``cnn-lowrank-svd-cka`` align the same targets with the paper's linear CKA instead.
* ``resnet18-separable-kd`` — recipes/edge_resnet18_separable.yaml: torchvision ResNet-18 (3×32×32, the few-label
  canvas data), its 16 block 3×3 convolutions → depthwise-separable, aligned with ``mse`` (CPU-sized), as shipped:
  with the guide as teacher in fine-tuning (``finetune.distill: {}``); ``resnet18-separable``: without it.
* ``resnet18-mobilenetv3`` — recipes/resnet18_to_mobilenetv3.yaml: architecture transfer of the same ResNet-18
  into torchvision's MobileNetV3-small, whose 11 blocks are grouped under the guide's 8 (issue 19). Both ResNet-18
  settings share one guide, trained 15 epochs on the 1,000 labelled images first (``train-guide`` on the recipe).
* ``minilm-edge`` — recipes/edge_minilm.yaml (feed-forward layers at half rank from an activation-weighted SVD,
  softmax attention kept), on 8,000 training sentences (CPU-sized: a fine-tuning epoch is 125 steps);
  ``minilm-edge-all`` the recipe as shipped, on all 29,547 (461 fine-tuning steps: about 85 min per seed with the
  baselines on a 2-core CPU, so not run by default).
* ``gpt2-edge-1000`` / ``gpt2-edge`` — recipes/edge_gpt2_linear_attention.yaml with 1,000 training sequences and
  with all of them (the guide trains 10 epochs on the whole corpus first: GPU); ``gpt2-edge-1000-cpu`` the same
  few-data conversion of a CPU-sized GPT-2 (4 blocks of width 64, the corpus's own 2,048-token BPE:
  ``common.cpu_sized_gpt2``); ``gpt2-edge-cpu`` the same conversion with every training sequence (8,550) at about
  the few-data row's steps (15 alignment steps per epoch, one fine-tuning epoch: 493 against 420). A GPT-2 guide
  trains on every training sequence (``common.full_data_guide``).

Usage: python bench/edge.py [--settings cnn-separable,...] [--seeds 0,1,2] [--device auto] [--small]
Writes runs/bench-edge/edge.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import math
from pathlib import Path

from common import (bench_progress, SPEEDUPS, add_seeds_option, add_small_option, cached_guide, finished_report, guide_raw, merge,
                    onnx_speedups, pm, run_settings, setting_raw, settings_parser, smoke_note, speed_text)

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.artifacts import save_target
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.deploy.evaluate import evaluate_onnx
from theseus_cli.deploy.interleave import latency_budget
from theseus_cli.deploy.export import ExportOptions, export_target
from theseus_cli.errors import ExportError
from theseus_cli.target_meta import ArchSpec, Normalization, TargetMeta
from theseus_cli.training.session import open_session

CNN_SEP, CNN_LOW = "recipes/edge_cnn_separable.yaml", "recipes/edge_cnn_lowrank.yaml"
_CNN = {"guide_epochs": 30, "guide_lr": 2e-3}
# Both ResNet-18 rows convert one guide (same data fields, so one cache entry): they compare two edge targets of it.
_R18 = {"guide_epochs": 15, "guide_lr": 1e-3, "guide_name": "edge-resnet18"}
_GPT2 = {"recipe": "recipes/edge_gpt2_linear_attention.yaml", "guide_epochs": 10, "guide_lr": 2e-3, "default": False,
         "guide_data": "all"}
SETTINGS = {
    "cnn-separable": {"recipe": CNN_SEP, **_CNN},
    "cnn-lowrank-svd": {"recipe": CNN_LOW, **_CNN},
    "cnn-lowrank-random": {"recipe": CNN_LOW, **_CNN, "override": {"replace": [
        {"match": "re:.*conv\\d", "with": "lowrank_conv", "params": {"rank_ratio": 0.25, "init": "random"}}]}},
    "cnn-separable-cka": {"recipe": CNN_SEP, **_CNN, "override": {"similarity": {"kind": "cka"}}},
    "cnn-lowrank-svd-cka": {"recipe": CNN_LOW, **_CNN, "override": {"similarity": {"kind": "cka"}}},
    "resnet18-separable": {"recipe": "recipes/edge_resnet18_separable.yaml", **_R18,
                           "override": {"finetune": {"distill": None}}},
    "resnet18-separable-kd": {"recipe": "recipes/edge_resnet18_separable.yaml", **_R18},
    "resnet18-mobilenetv3": {"recipe": "recipes/resnet18_to_mobilenetv3.yaml", **_R18},
    "minilm-edge": {"recipe": "recipes/edge_minilm.yaml", "override": {"data": {"train_limit": 8000}}},
    "minilm-edge-all": {"recipe": "recipes/edge_minilm.yaml", "default": False},  # as shipped: every sentence
    "gpt2-edge-1000": {**_GPT2, "override": {"data": {"train_limit": 1000}}},
    "gpt2-edge": _GPT2,
    "gpt2-edge-1000-cpu": {**_GPT2, "cpu_gpt2": True, "guide_name": "kjv-gpt2-cpu",
                           "override": {"data": {"train_limit": 1000}}},
    # every training sequence, at about the few-data row's step budget (a CPU session cannot run the recipe's full
    # epochs over 8,550 sequences: about 3 hours per seed with the baselines)
    "gpt2-edge-cpu": {**_GPT2, "cpu_gpt2": True, "guide_name": "kjv-gpt2-cpu",
                      "override": {"align": {"max_steps_per_epoch": 15}, "finetune": {"epochs": 1}}},
}
SMALL = {"classification": {"data": {"train_limit": 256, "label_limit": 64, "test_limit": 64, "batch_size": 32},
                            "align": {"epochs": 1, "max_steps_per_epoch": 2}, "finetune": {"epochs": 1},
                            "bn_recalibration": {"batches": 2}},
         "text": {"data": {"sequence_length": 16, "train_limit": 48, "test_limit": 16, "batch_size": 16},
                  "align": {"epochs": 1, "max_steps_per_epoch": 1}, "finetune": {"epochs": 1}}}
GPT2_SMALL = {"guide": {"kwargs": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 16}}}
ONNX_THREADS = 1


def raw_recipe(spec: dict, seed: int, small: bool) -> dict:
    raw = merge(setting_raw(spec), {"seed": seed, "data": {"seed": 0}, "baseline": {"runs": ["scratch", "distill"]}})
    if small:
        raw = merge(raw, SMALL["classification" if raw.get("task", "classification") == "classification" else "text"])
        if raw.get("task") == "causal-lm":
            raw = merge(raw, GPT2_SMALL)
    return raw


def the_guide(name: str, spec: dict, raw: dict, device: str, small: bool, hold_out=None) -> Path | None:
    """The setting's trained guide (cached, seed 0), or None where the recipe's guide is pretrained (MiniLM).
    ``hold_out``: a search file's ``validation``, whose held-out labels the guide does not train on."""
    if "guide_epochs" not in spec:
        return None
    recipe = parse_recipe(guide_raw(spec, raw, small), spec["recipe"])
    return cached_guide(spec.get("guide_name", f"edge-{name}"), recipe, 1 if small else spec["guide_epochs"],
                        spec["guide_lr"], device, hold_out=hold_out)[0]


def guide_as_target(raw: dict, guide: Path | None, out: Path) -> Path:
    """The guide saved in the target format (no replacements), so it is exported and judged exactly as targets."""
    recipe = parse_recipe(raw, "guide")
    session = open_session(recipe, guide, "cpu")
    data = session.data
    meta = TargetMeta(task=recipe.task, guide=ArchSpec(arch=recipe.guide.arch, kwargs=recipe.guide.kwargs), entries=[],
                      input_shape=list(data.input_shape), num_classes=data.num_classes,
                      normalization=Normalization(mean=data.mean, std=data.std) if data.mean else None,
                      tokenizer=data.tokenizer, recipe=recipe.resolved(), recipe_hash=recipe.digest())
    out.mkdir(parents=True, exist_ok=True)
    save_target(out / "target.safetensors", session.guide.cpu(), meta)
    return out / "target.safetensors"


def on_onnxruntime(target: Path, out_dir: Path) -> dict:
    """fp32 and int8 ONNX files of ``target``: test metric and size on ONNX Runtime, and the file (timed later,
    with the other model's files, in one interleaved run: :func:`common.onnx_speedups`)."""
    found = {}
    for kind, quantize in (("fp32", None), ("int8", "int8")):
        out = out_dir / f"{kind}.onnx"
        try:
            export_target(target, "onnx", ExportOptions(out=out, overwrite=True, quantize=quantize))
        except ExportError as exc:
            found[kind] = {"refused": str(exc)}
            continue
        res = evaluate_onnx(out, latency=False, threads=ONNX_THREADS)
        found[kind] = {"metric": res["metric"]["value"], "size_bytes": res["size_bytes"], "path": out}
    return found


def timed_files(onnx_g: dict, onnx_t: dict, recipe, guide: Path | None) -> dict:
    """The guide's and the target's ONNX files, fp32 and int8, timed in one interleaved run at batch 1 with
    ONNX_THREADS threads: each file's median ms and the per-round speed-ups with their ranges."""
    files = {f"{who}_{kind}": res["path"] for who, found in (("guide", onnx_g), ("target", onnx_t))
             for kind, res in found.items() if "path" in res}
    sample = open_session(recipe, guide, "cpu", probe=False).data.x_test[:1]
    return onnx_speedups(files, sample, ONNX_THREADS, 5 * latency_budget())  # 1.5 s a file at the default budget


def run_one(name: str, spec: dict, out_root: Path, seed: int, device: str = "auto", small: bool = False) -> dict:
    raw = raw_recipe(spec, seed, small)
    guide = the_guide(name, spec, raw, device, small)
    run, recipe = out_root / name, parse_recipe(raw, f"{name} seed {seed}")
    report = finished_report(run, recipe.digest(), guide) or run_conversion(
        recipe, run, ConvertOptions(progress=bench_progress(), checkpoint=guide, device=device, baseline=True, overwrite=not (run / ".resume").is_dir(),
                                    resume=(run / ".resume").is_dir()))  # a killed run goes on from its last stage
    m, dep = report["metric"], report["deployment"]
    onnx_t = on_onnxruntime(run, run / "onnx")
    onnx_g = on_onnxruntime(guide_as_target(raw, guide, run / "guide"), run / "guide" / "onnx")
    row = {"setting": name, "recipe": spec["recipe"], "metric_name": m["name"], "higher_is_better": m["higher_is_better"],
           "small": small, "data": report["data"], "steps": report["steps"]["alignment"] + report["steps"]["finetune"],
           "guide": m["guide"], "not": m["target"], "scratch": m["baselines"]["scratch"],
           "distill": m["baselines"]["distill"], "retention": m["retention"],
           "guide_params": dep["guide"]["params"], "target_params": dep["target"]["params"],
           "guide_flops": dep["guide"]["flops_per_example"], "target_flops": dep["target"]["flops_per_example"],
           "guide_pt_b1_ms": dep["guide"]["latency"]["1"]["median_ms"],
           "target_pt_b1_ms": dep["target"]["latency"]["1"]["median_ms"],
           "int8_refused": {k: v["int8"]["refused"] for k, v in (("guide", onnx_g), ("target", onnx_t)) if "refused" in v["int8"]},
           "wall_time": {"total": report["wall_time"]["total"]}}
    timed = timed_files(onnx_g, onnx_t, recipe, guide)
    for who, found in (("guide", onnx_g), ("target", onnx_t)):
        for kind, res in found.items():
            for key in ("metric", "size_bytes"):  # NaN where the int8 file was refused: every seed's row
                row[f"{who}_{kind}_{key}"] = res.get(key, float("nan"))  # has every key
            row[f"{who}_{kind}_b1_ms"] = timed.get(f"{who}_{kind}_b1_ms", float("nan"))
    row["timing_rounds"] = timed["rounds"]
    for label, _, _ in SPEEDUPS:
        for end in ("", "_min", "_max"):
            row[f"speed_{label}{end}"] = timed.get(f"speed_{label}{end}", float("nan"))
    return row


def refusals(r: dict) -> list[str]:
    """Every seed's int8 refusals, one line each."""
    per_seed = zip(r.get("seeds", [None]), r.get("per_seed", [r]))
    return [f"int8 refused for the {who}{'' if s is None else f' (seed {s})'}: {msg}"
            for s, row in per_seed for who, msg in row["int8_refused"].items()]


def verdict(r: dict) -> str:
    """Whether the row meets the goal: ≥ 2× faster on ONNX Runtime at batch 1 (best of fp32/int8 target against
    the float guide), ≥ 97 % retention, better than scratch and distillation."""
    sign = 1 if r["higher_is_better"] else -1
    # speed-ups are medians of per-round ratios, guide and target files timed alternately in one run (then seed means)
    speeds = {k: r.get(f"speed_{k}", math.nan) for k in ("fp32", "int8_vs_fp32")}
    best_kind = max(speeds, key=lambda k: speeds[k] if math.isfinite(speeds[k]) else -1.0)
    speed = speeds[best_kind]
    beats = [b for b in ("scratch", "distill") if sign * (r["not"] - r[b]) > 0]
    ok = speed >= 2 and r["retention"] >= 0.97 and len(beats) == 2
    # int8 speeds the guide up too: what the conversion adds over quantising the guide is file against file
    same_kind = " / ".join(f"{label} {speed_text(r, key)}" for label, key in (("fp32", "fp32"), ("int8", "int8_vs_int8"))
                           if math.isfinite(r.get(f"speed_{key}", math.nan)))
    return (f"{'meets' if ok else 'misses'} the goal: {speed_text(r, best_kind)} faster than the float guide on ONNX "
            f"Runtime at batch 1 (best target file: {best_kind.split('_')[0]}; per-round ratios, files timed "
            f"alternately), retention {r['retention']:.4f}, NoT better than "
            f"{' and '.join(beats) if beats else 'neither baseline'} (means over seeds); target against the guide's "
            f"file of the same kind: {same_kind or 'n/a'}")


def _kb(r: dict, who: str) -> str:
    """The ONNX files' sizes (the same at every seed up to a few bytes of metadata; seed means)."""
    return " / ".join(f"{r[f'{who}_{kind}_size_bytes'] / 1024:.1f}" for kind in ("fp32", "int8"))


def markdown(rows: list, device: str) -> str:
    lines = []
    for r in rows:
        f = "{:.2f}" if r["metric_name"] == "perplexity" else "{:.4f}"
        lines += [f"**{r['setting']}** ({r['recipe']}) — {r['metric_name']}; {r['data']['train']:,} training inputs, "
                  f"{r['data']['labelled']:,} labelled; {r['steps']:,.0f} gradient steps per method",
                  "", f"| model | {r['metric_name']} | params | FLOPs/example | PyTorch b=1 ms | ORT fp32 b=1 ms | "
                  f"ORT int8 b=1 ms | int8 {r['metric_name']} | file KB fp32 / int8 |", "|---|---|---|---|---|---|---|---|---|"]
        for who, label in (("guide", "guide"), ("target", "**NoT target**")):
            int8, int8_m = pm(r, f"{who}_int8_b1_ms", "{:.3f}"), pm(r, f"{who}_int8_metric", f)
            lines.append(f"| {label} | {pm(r, 'guide' if who == 'guide' else 'not', f)} | {r[f'{who}_params']:,.0f} | "
                         f"{r[f'{who}_flops'] / 1e6:.2f}M | {pm(r, f'{who}_pt_b1_ms', '{:.3f}')} | "
                         f"{pm(r, f'{who}_fp32_b1_ms', '{:.3f}')} | {int8} | {int8_m} | {_kb(r, who)} |")
        for b, label in (("scratch", "target from scratch"), ("distill", "target distilled from the guide")):
            lines.append(f"| {label} | {pm(r, b, f)} | (same as target) | | | | | | |")
        speeds = ", ".join(f"{what} {speed_text(r, key)}" for what, key in (
            ("fp32 target vs fp32 guide", "fp32"), ("int8 target vs fp32 guide", "int8_vs_fp32"),
            ("int8 target vs int8 guide", "int8_vs_int8")))
        lines += ["", f"Speed-ups on ONNX Runtime at batch 1 (guide time / target time; median of per-round ratios, "
                      f"the four files timed alternately in one run, range in brackets): {speeds}.",
                  "", verdict(r)] + refusals(r) + [""]
    note = smoke_note(rows)
    return "\n".join(lines) + f"\nDevice: {device}; ONNX Runtime with {ONNX_THREADS} intra-op thread.{note}\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench-edge")
    add_seeds_option(parser)
    add_small_option(parser)
    args = parser.parse_args()
    run_settings(parser, args, SETTINGS, "edge",
                 lambda name, spec, out, seed: run_one(name, spec, out, seed, args.device, args.small), markdown)


if __name__ == "__main__":
    main()
