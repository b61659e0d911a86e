"""Every published guide-against-target latency ratio, re-measured the one way that holds on a shared machine.

Issue 36 found ratios of docs/BENCHMARKS.md and the README off by up to 2.5× (on an Intel Xeon): guide and target had
been timed at different moments of a shared CPU, and a ratio of two medians taken minutes apart measures the machine
as much as the models. Here, for each edge conversion the docs quote a speed for, guide and target are exported to ONNX (float,
and int8 through ``theseus export --quantize int8``) and run by ONNX Runtime's CPU provider **in one process, in
alternating rounds** (:mod:`theseus_cli.deploy.interleave`: 15 rounds, the order reversed every other round); each
ratio is the median of the per-round ratios, with their range.

Latency does not depend on the trained values of these dense models' weights, so each pair is the recipe's guide
(untrained) and its target after a token conversion (one alignment step per stage, one short fine-tuning epoch on
64 examples): the exported graphs are exactly those a full conversion writes, at a fraction of the time. The
accuracy figures of those conversions stay where they are in docs/BENCHMARKS.md; this script measures speed only.

Columns: the float target against the float guide (fp32/fp32), the int8 target against the float guide (what an
edge job that may quantise gets over shipping the guide as is), and the int8 target against the guide's own int8
file (what the conversion adds once both are quantised). A ratio above 1 means the target is faster.

Usage: python bench/latency_ratios.py [--settings ...] [--threads 1,2] [--small]
(``--small``: a smoke run, the float files only, timed briefly.)
Writes runs/bench-latency/latency_ratios.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import (add_small_option, bench_progress, merge, onnx_speedups, run_settings, setting_raw, settings_parser, smoke_note,
                    speed_text)

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.deploy.export import ExportOptions, export_target
from theseus_cli.deploy.interleave import latency_budget
from theseus_cli.errors import ExportError

SETTINGS = {
    "resnet18-separable": {"recipe": "recipes/edge_resnet18_separable.yaml",
                           "what": "torchvision ResNet-18 → separable convs (edge_resnet18_separable.yaml)"},
    "resnet18-mobilenetv3": {"recipe": "recipes/resnet18_to_mobilenetv3.yaml",
                             "what": "ResNet-18 → MobileNetV3-small (resnet18_to_mobilenetv3.yaml)"},
    "cnn-separable": {"recipe": "recipes/edge_cnn_separable.yaml", "what": "demo CNN → separable convs"},
    "cnn-lowrank": {"recipe": "recipes/edge_cnn_lowrank.yaml", "what": "demo CNN → low-rank convs"},
    "minilm-edge": {"recipe": "recipes/edge_minilm.yaml", "what": "all-MiniLM-L6-v2 → half-rank feed-forward"},
    "gpt2-edge-cpu": {"recipe": "recipes/edge_gpt2_linear_attention.yaml", "cpu_gpt2": True,
                      "what": "CPU-sized GPT-2 → linear attention, 128 tokens"},
}
TOKEN = {"classification": {"data": {"train_limit": 64, "label_limit": 64, "test_limit": 32, "batch_size": 32},
                            "align": {"epochs": 1, "max_steps_per_epoch": 1}, "finetune": {"epochs": 1},
                            "bn_recalibration": {"batches": 1}, "baseline": {"enabled": False}},
         "text": {"data": {"train_limit": 32, "test_limit": 8, "batch_size": 16},
                  "align": {"epochs": 1, "max_steps_per_epoch": 1}, "finetune": {"epochs": 1},
                  "baseline": {"enabled": False}}}
SMALL_TEXT = {"data": {"sequence_length": 16}, "guide": {"kwargs": {"n_layer": 2, "n_embd": 32, "n_head": 2,
                                                                     "n_positions": 16}}}
FILES = ("guide_fp32", "target_fp32", "guide_int8", "target_int8")


def token_recipe(spec: dict, small: bool):
    raw = setting_raw(spec)
    kind = "classification" if raw.get("task", "classification") == "classification" else "text"
    raw = merge(raw, TOKEN[kind])
    if small and raw.get("task") == "causal-lm":
        raw = merge(raw, SMALL_TEXT)
    return raw


def export_files(run: Path, guide_target: Path, small: bool = False) -> dict[str, Path]:
    """The four ONNX files (a ``--small`` smoke run: the two float ones; bench/edge.py's smoke run covers int8); int8
    allowed any metric drop (the weights are a token conversion's: speed only)."""
    files = {}
    kinds = (("fp32", None),) if small else (("fp32", None), ("int8", "int8"))
    for who, source in (("guide", guide_target), ("target", run)):
        for kind, quantize in kinds:
            out = run / "onnx" / f"{who}_{kind}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                export_target(source, "onnx", ExportOptions(out=out, overwrite=True, quantize=quantize,
                                                            max_metric_drop=1e9, calibration=32))
            except ExportError as exc:
                print(f"{who} {kind}: not exported: {exc}")
                continue
            files[f"{who}_{kind}"] = out
    return files


def run_one(name: str, spec: dict, out_root: Path, threads: tuple[int, ...] = (1, 2), small: bool = False) -> dict:
    from edge import guide_as_target

    from theseus_cli.training.session import open_session

    started = time.perf_counter()
    raw = token_recipe(spec, small)
    run = out_root / name
    run_conversion(parse_recipe(raw, name), run, ConvertOptions(device="cpu", overwrite=True, latency=False,
                                                                progress=bench_progress()))
    files = export_files(run, guide_as_target(raw, None, run / "guide"), small)
    sample = open_session(parse_recipe(raw, name), None, "cpu", probe=False).data.x_test[:1]
    budget = 5 * latency_budget()  # 1.5 s a file at the default budget
    timings = [{"threads": t, **onnx_speedups(files, sample, t, budget)} for t in threads]
    return {"setting": name, "recipe": spec["recipe"], "what": spec["what"], "small": small, "timings": timings,
            "wall_time": {"total": time.perf_counter() - started}}


def markdown(rows: list, device: str) -> str:
    lines = [f"Device: {device}. Speed-up = guide time / target time, median of per-round ratios (range), ONNX Runtime "
             "CPU provider, batch 1, guide and target files timed in alternating rounds in one process.", "",
             "| conversion | threads | target fp32 vs guide fp32 | target int8 vs guide fp32 | target int8 vs guide int8 "
             "| median ms guide fp32 / target fp32 / guide int8 / target int8 |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t in r["timings"]:
            cells = [speed_text(t, key) for key in ("fp32", "int8_vs_fp32", "int8_vs_int8")]
            ms = " / ".join(f"{t[f'{f}_b1_ms']:.3f}" if f"{f}_b1_ms" in t else "—" for f in FILES)
            lines.append(f"| {r['what']} | {t['threads']} | {' | '.join(cells)} | {ms} |")
    return "\n".join(lines) + "\n" + smoke_note(rows) + "\n"


def main() -> None:
    parser = settings_parser(__doc__, SETTINGS, "bench-latency")
    parser.add_argument("--threads", default="1,2", help="ONNX Runtime intra-op thread counts, comma-separated")
    add_small_option(parser)
    args = parser.parse_args()
    threads = tuple(int(t) for t in args.threads.split(","))
    run_settings(parser, args, SETTINGS, "latency_ratios",
                 lambda name, spec, out: run_one(name, spec, out, threads, args.small), markdown)


if __name__ == "__main__":
    main()
