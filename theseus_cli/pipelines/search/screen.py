"""Phase 1 of a search: every candidate architecture built, exported and timed on ONNX Runtime before any
gradient step.

Latency does not depend on the weights, so each architecture is timed with its initial ones: the guide with
the space's replacements swapped in (as the conversion's first stage would build them), exported with the same
exporter and checks as ``theseus export`` (in the goal's precision: int8 files quantised as ``export --quantize
int8`` quantises them), and timed in one process **alternating with the guide's fp32 file** (the guide as deployed today: every ratio is to it)
(:func:`theseus_cli.deploy.onnx_runtime.onnx_latency_pair`), so a machine that drifts while phase 1 runs shows up
as a wider range of the per-round ratio, not as a faster candidate. An architecture that misses a goal (latency,
parameters, file size) is dropped with its reason before phase 2 spends anything on it. Results are cached by
architecture digest in ``DIR/phase1.json`` under a key of everything the figures depend on (ONNX Runtime's
version, the CPU, the runtime goal, the guide and input shape), so a resumed search or a second worker does not
time them again.
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from theseus_cli.artifacts import write_json
from theseus_cli.config.recipe import Recipe, RuleConfig
from theseus_cli.config.search import Goals
from theseus_cli.deploy.export import export_onnx
from theseus_cli.deploy.onnx_runtime import onnx_latency_pair, open_onnx
from theseus_cli.deploy.parity import Deployable, sample_inputs
from theseus_cli.deploy.quantize import QuantizeJob, write_int8
from theseus_cli.errors import ExportError
from theseus_cli.pipelines.conversion_output import meta_for
from theseus_cli.pipelines.search.space import Architecture
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.training.session import Session

CACHE_FILE = "phase1.json"
CALIBRATION = 128  # training inputs that calibrate a static int8 file's activation ranges in phase 1
MB = 1e6
TIMING_BUDGETS = 3  # phase 1 times each pair for three times $THESEUS_LATENCY_BUDGET_S (0.3 s) per file


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def goal_problems(record: dict[str, Any], goals: Goals) -> list[str]:
    """Why a phase-1 record (an architecture's or the guide's) misses the goals phase 1 can check; empty if it meets
    them. Latency must be within the goal less ``goals.latency_margin``: the final file is timed again, in another
    round of a machine's drift, and gated at the goal itself."""
    out, within = [], 1 - goals.latency_margin
    said = f" (the goal less its {goals.latency_margin:.0%} margin)" if goals.latency_margin else ""
    if goals.max_latency_ms is not None and record["latency_ms"] > goals.max_latency_ms * within:
        out.append(f"latency {record['latency_ms']:.3g} ms > {goals.max_latency_ms * within:.3g} ms{said}")
    ratio = (record.get("ratio_to_guide") or {}).get("median")
    if goals.max_latency_ratio is not None and ratio is not None and ratio > goals.max_latency_ratio * within:
        out.append(f"latency ×{ratio:.3g} the guide's > ×{goals.max_latency_ratio * within:.3g}{said}")
    if goals.max_params is not None and record["params"] > goals.max_params:
        out.append(f"params {record['params']:,} > {goals.max_params:,}")
    if goals.max_file_mb is not None and record["file_bytes"] / MB > goals.max_file_mb:
        out.append(f"file {record['file_bytes'] / MB:.3g} MB > {goals.max_file_mb:g} MB")
    return out


@dataclass
class Screen:
    """Phase 1 on one session: the guide's files, then each architecture's, timed against the guide."""

    session: Session
    base: Recipe
    goals: Goals
    cache_path: Path | None  # None: nothing cached (``inspect``)
    progress: Progress = NullProgress()

    def __post_init__(self):
        import onnxruntime

        rt = self.goals.runtime
        self.key = {"onnxruntime": onnxruntime.__version__, "cpu": cpu_name(), "runtime": rt.model_dump(),
                    "guide": {"arch": self.base.guide.arch, "kwargs": self.base.guide.kwargs},
                    "input_shape": list(self.session.data.input_shape)}
        self.cache = self._read_cache()
        self.work = tempfile.TemporaryDirectory(prefix="theseus-phase1-")
        self.sample = self.session.data.x_train[:1].to("cpu")
        self.guide_cpu = copy.deepcopy(self.session.guide).cpu().eval()
        self.guide_paths = {}

    def _read_cache(self) -> dict[str, Any]:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("architectures", {}) if isinstance(data, dict) and data.get("key") == self.key else {}

    def _save_cache(self) -> None:
        if self.cache_path is not None:
            write_json(self.cache_path, {"key": self.key, "architectures": self.cache})

    def close(self) -> None:
        self.work.cleanup()

    # ------------------------------------------------------------------ files

    def _export(self, model: torch.nn.Module, recipe: Recipe, plan, name: str, precision: str) -> Path:
        """``model`` as the ONNX file of ``precision`` in the scratch folder (int8: quantised from the float one)."""
        meta = meta_for(recipe, self.session, plan)
        wrapper = Deployable(model, recipe.task).eval()
        fp32 = Path(self.work.name) / f"{name}.onnx"
        export_onnx(wrapper, sample_inputs(model, meta), fp32, meta, 1e-3, 1e-2, exporter=self.goals.runtime.exporter)
        return fp32 if precision == "fp32" else self._int8(fp32, name)

    def _int8(self, fp32: Path, name: str) -> Path:
        reader = open_onnx(fp32, 1)
        x = self.session.data.x_train[:CALIBRATION].to("cpu")
        feeds = [reader.feeds(x[s:s + 32]) for s in range(0, x.shape[0], 32)]
        int8 = Path(self.work.name) / f"{name}.int8.onnx"
        with tempfile.TemporaryDirectory(dir=self.work.name) as scratch:
            write_int8(QuantizeJob(fp32, feeds, None, None, None, 0), int8, Path(scratch))
        return int8

    def guide(self) -> dict[str, Any]:
        """The guide's fp32 and int8 files timed against each other: the two guide candidates."""
        plan = build_plan(self.guide_cpu, self.base.model_copy(update={"replace": []}), self.session.data.x_train[:2].to("cpu"))
        self.guide_paths["fp32"] = self._export(self.guide_cpu, self.base, plan, "guide", "fp32")
        self.guide_paths["int8"] = self._int8(self.guide_paths["fp32"], "guide")
        timed = self._time({"fp32": self.guide_paths["fp32"], "int8": self.guide_paths["int8"]})
        out = {}
        for precision, path in self.guide_paths.items():
            out[precision] = {"params": plan.guide_params, "file_bytes": path.stat().st_size,
                              "latency_ms": timed["latency"][precision][str(self.goals.runtime.batch)]["median_ms"]}
        out["fp32"]["ratio_to_guide"] = {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": 0}  # it is the reference
        ratio = timed["ratios"]["int8"][str(self.goals.runtime.batch)]
        out["int8"]["ratio_to_guide"] = {k: ratio[k] for k in ("median", "min", "max", "rounds")}
        return out

    def _time(self, files: dict[str, Path]) -> dict[str, Any]:
        """The files timed alternating, for :data:`TIMING_BUDGETS` × the usual budget: a phase-1 figure decides
        whether an architecture is trained at all, so it gets more rounds than a report's."""
        from theseus_cli.deploy.interleave import latency_budget

        rt = self.goals.runtime
        models = {name: open_onnx(path, rt.threads) for name, path in files.items()}
        return onnx_latency_pair(models, self.sample, (rt.batch,),
                                 budget_s=TIMING_BUDGETS * latency_budget() * len(models))

    # ------------------------------------------------------------------ architectures

    def architecture(self, arch: Architecture) -> dict[str, Any]:
        """The phase-1 record of ``arch`` (from the cache when it holds one)."""
        if arch.digest in self.cache:
            return self.cache[arch.digest]
        recipe = self.base.model_copy(update={"replace": [RuleConfig.model_validate(r) for r in arch.replace_rules()]})
        plan = build_plan(self.guide_cpu, recipe, self.session.data.x_train[:2].to("cpu"))
        model = copy.deepcopy(self.guide_cpu)
        torch.manual_seed(self.base.seed)
        apply_entries(model, plan.entries)
        record: dict[str, Any] = {"digest": arch.digest, "label": arch.label, "params": plan.target_params,
                                  "flops": plan.target_flops, "stages": len(plan.stages)}
        precision, batch = self.goals.runtime.precision, str(self.goals.runtime.batch)
        try:
            path = self._export(model.eval(), recipe, plan, arch.digest, precision)
        except ExportError as exc:
            record.update(exported=False, dropped=[f"not exportable: {exc}"], feasible=False)
        else:
            timed = self._time({"guide": self.guide_paths["fp32"], "candidate": path})
            ratio = timed["ratios"]["candidate"][batch]
            record.update(exported=True, file_bytes=path.stat().st_size,
                          latency_ms=timed["latency"]["candidate"][batch]["median_ms"],
                          guide_latency_ms=timed["latency"]["guide"][batch]["median_ms"],
                          ratio_to_guide={k: ratio[k] for k in ("median", "min", "max", "rounds")})
            record["dropped"] = goal_problems(record, self.goals)
            record["feasible"] = not record["dropped"]
            path.unlink(missing_ok=True)
        self.cache[arch.digest] = record
        self._save_cache()
        return record
