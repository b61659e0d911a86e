"""``DIR/best``: the winner as a normal run directory, its test metric, and its deployable files measured again.

The directory is assembled under ``DIR/.best.tmp`` and renamed into place whole, so ``best/`` is at every instant
absent or complete. The **test** split is read here for the first time in the search: once for the winner (and
once for the guide, for its retention), after the choice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from theseus_cli.artifacts import REPORT_FILE, load_target, write_json
from theseus_cli.config.search import Goals
from theseus_cli.deploy.export import ExportOptions, export_target
from theseus_cli.deploy.onnx_runtime import onnx_latency_pair, onnx_metric, open_onnx
from theseus_cli.errors import ExportError
from theseus_cli.pipelines.checks import retention
from theseus_cli.pipelines.search.files import BEST_DIR
from theseus_cli.pipelines.search.screen import MB
from theseus_cli.tasks import get_task
from theseus_cli.training import evaluate

if TYPE_CHECKING:
    from theseus_cli.pipelines.search.pipeline import Search

LEFT_BEHIND = {".theseus.lock", ".resume"}


def _test_split(search: "Search"):
    """The base session's test inputs and what they are scored against (sentence embeddings: the guide's)."""
    data = search.session.data
    if search.base.task == "sentence-embedding" and data.y_test is None:
        from theseus_cli.training.loops import embed

        data.y_test = embed(search.session.guide, data.x_test, search.base.data.eval_batch_size, search.session.device)
    return data.x_test, data.y_test


def test_metric(search: "Search", model: torch.nn.Module) -> float:
    x, y = _test_split(search)
    return evaluate(model.to(search.session.device), get_task(search.base.task), x, y,
                    search.base.data.eval_batch_size, search.session.device)


def _onnx_test_metric(search: "Search", path: Path) -> float:
    x, y = _test_split(search)
    return onnx_metric(open_onnx(path, 1), get_task(search.base.task), x.to("cpu"), None if y is None else y.cpu(),
                       search.base.data.eval_batch_size)


def _exports(tmp: Path, precision: str, exporter: str) -> tuple[dict[str, Any], Path | None]:
    """The winner's float and int8 ONNX files (an int8 file the metric check refuses is reported, not fatal unless
    the goal's precision is int8), and the file of the goal's precision."""
    fp32 = export_target(tmp, "onnx", ExportOptions(out=tmp / "target.onnx", exporter=exporter))
    exports: dict[str, Any] = {"fp32": {"file": "target.onnx", "size_bytes": fp32["size_bytes"],
                                        "exporter": fp32.get("exporter"), "parity": fp32.get("parity")}}
    try:
        int8 = export_target(tmp, "onnx", ExportOptions(quantize="int8", exporter=exporter))
        exports["int8"] = {"file": Path(int8["out"]).name, "size_bytes": int8["size_bytes"],
                           "quantization": {k: int8["quantization"][k] for k in ("mode", "float", "int8",
                                                                                  "int8_over_float", "warnings")}}
    except ExportError as exc:
        exports["int8"] = {"refused": str(exc)}
    chosen = exports[precision]
    return exports, (tmp / chosen["file"] if "file" in chosen else None)


def write_best(search: "Search", winner: dict[str, Any], goals: Goals) -> dict[str, Any]:
    out = search.out
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rt = goals.runtime
    guide_test = test_metric(search, search.session.guide)
    if winner["kind"] == "conversion":
        shutil.copytree(search.trial_dir_of(winner), tmp, ignore=lambda d, names: [n for n in names if n in LEFT_BEHIND])
        model = load_target(tmp, "cpu")
        target_test = test_metric(search, model)
        search.progress.log(f"finish: exporting the winner to ONNX (fp32 and int8) and timing its {rt.precision} "
                            "file against the guide's")
        exports, deployed = _exports(tmp, rt.precision, rt.exporter)
        params = sum(p.numel() for p in model.parameters())
    else:
        tmp.mkdir(parents=True)
        deployed = tmp / ("guide.onnx" if winner["precision"] == "fp32" else "guide.int8.onnx")
        shutil.copy2(search.screener.guide_paths[winner["precision"]], deployed)
        target_test = _onnx_test_metric(search, deployed) if winner["precision"] == "int8" else guide_test
        exports = {winner["precision"]: {"file": deployed.name, "size_bytes": deployed.stat().st_size}}
        params = winner["params"]
    summary = _measured(search, winner, deployed, guide_test, target_test, exports, params, goals)
    report_path = tmp / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"winner": winner["label"]}
    report["search"] = summary
    write_json(report_path, report)
    final = out / BEST_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {"summary": summary}


def _measured(search: "Search", winner: dict, deployed: Path | None, guide_test: float, target_test: float,
              exports: dict, params: int, goals: Goals) -> dict[str, Any]:
    """The final figures of ``best/`` and the goals checked on them (the gates)."""
    task, rt = get_task(search.base.task), goals.runtime
    final: dict[str, Any] = {"file": deployed.name if deployed else None}
    if deployed is not None:
        timed = onnx_latency_pair({"guide": open_onnx(search.screener.guide_paths["fp32"], rt.threads),
                                   "target": open_onnx(deployed, rt.threads)}, search.session.data.x_train[:1].to("cpu"),
                                  (rt.batch,))
        b = str(rt.batch)
        final.update(latency_ms=timed["latency"]["target"][b]["median_ms"],
                     guide_latency_ms=timed["latency"]["guide"][b]["median_ms"],
                     ratio_to_guide={k: timed["ratios"]["target"][b][k] for k in ("median", "min", "max", "rounds")},
                     file_bytes=deployed.stat().st_size)
    kept = retention(task, guide_test, target_test)
    checks: dict[str, Any] = {}

    def check(name: str, value, threshold, ok) -> None:
        if threshold is not None:
            checks[name] = {"threshold": threshold, "value": value, "passed": value is not None and ok(value, threshold)}

    check("max_latency_ms", final.get("latency_ms"), goals.max_latency_ms, lambda v, t: v <= t)
    check("max_latency_ratio", final.get("ratio_to_guide", {}).get("median"), goals.max_latency_ratio,
          lambda v, t: v <= t)
    check("max_file_mb", final["file_bytes"] / MB if "file_bytes" in final else None, goals.max_file_mb, lambda v, t: v <= t)
    check("max_params", params, goals.max_params, lambda v, t: v <= t)
    check("min_retention", kept, goals.min_retention, lambda v, t: v >= t)
    return {"winner": winner["label"], "kind": winner["kind"], "evaluated_on": "validation split (held out of the "
            "training data); test: the recipe's test split, read once after the choice",
            "validation_metric": winner["validation_metric"],
            "test": {"metric": task.metric, "target": target_test, "guide": guide_test, "retention": kept},
            "params": params, "phase1_latency_ms": winner.get("latency_ms"), "final": final, "exports": exports,
            "gates": {"checks": checks, "passed": all(c["passed"] for c in checks.values())}}
