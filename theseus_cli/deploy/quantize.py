"""``theseus export --format onnx --quantize int8``: 8-bit integer weights with ONNX Runtime's quantisation tools,
written only if the task metric survives.

* **Which quantisation.** A graph with convolutions gets *static* QDQ quantisation (int8 weights per output
  channel, int8 activations whose ranges are calibrated, MinMax, on ``calibration`` training inputs drawn from the
  recipe's own training data with the target's normalisation): convolutions gain most from int8 activations, and
  ONNX Runtime fuses QDQ pairs into integer kernels. Any other graph (Linear-, RNN-, attention-heavy targets) gets
  *dynamic* quantisation: int8 weights, activations quantised on the fly per batch, no calibration to get wrong.
  Weights are quantised **per output channel** in both modes: one scale for a whole matrix is set by its largest
  column, and with 7 bits (below) every column a hundred times smaller rounds to a handful of levels or to zero.
  The pretrained all-MiniLM-L6-v2 lost 0.13 of embedding cosine to the float file with one scale per matrix and
  0.008 with one per output channel (ONNX Runtime 1.32 on this workplace's CPU), at the same file size and speed.
  The graph is pre-processed first (ONNX Runtime's ``quant_pre_process``: shape inference and graph
  optimisation) where that succeeds.
* **7-bit weights** (``reduce_range``). x86 CPUs without VNNI instructions (AVX2, AVX-512 before Cascade Lake)
  multiply uint8 activations by int8 weights with an instruction that adds pairs of products into a saturating
  int16; full-range int8 weights overflow it. A width-4 test CNN lost 22 points of accuracy that way on this
  workplace's AVX2 CPU, while the same QDQ graph run unfused was exact to 0.1 in the logits. The file is meant for
  devices whose CPU the export cannot see, so weights always use 7 bits (symmetric, values in [−64, 64]): safe on every CPU,
  at the cost of one bit of weight precision (the metric check below still judges the result).
* **The check.** An int8 file cannot match PyTorch element-wise at 1e-4, so the check is the task metric on the
  test split: the float ONNX file and the int8 file are both run by ONNX Runtime on the same inputs, and the int8
  file is written only if its metric is within ``max_metric_drop`` of the float one — in points of the metric for
  accuracy and cosine (default 0.01: one point), as a fraction for perplexity (default 0.02: 2 % higher at most).
  Otherwise :class:`~theseus_cli.errors.ExportError` (exit 11) with both figures, and nothing is written.
* **What is reported.** Float and int8 metric, file size and batch-1 latency (the two files timed in alternating
  rounds in one process), the mode, the calibration size, and a warning when the int8 file is not smaller or not
  faster than the float one: a valid int8 file is not always a better one (a depthwise-separable graph's
  quantise/dequantise pairs can cost more than its small convolutions save).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from theseus_cli.deploy.onnx_runtime import ONNX_META_KEY, OnnxTarget, onnx_latency_pair, onnx_metric, open_onnx
from theseus_cli.errors import ExportError
from theseus_cli.progress import NullProgress

DEFAULT_DROP = {"perplexity": 0.02, "accuracy": 0.01, "cosine_to_guide": 0.01}


@dataclass(frozen=True)
class QuantizeJob:
    """The float ONNX file, the data it is calibrated and judged on, and the tolerance."""

    fp32: Path
    calibration: list[dict[str, np.ndarray]]  # session feeds, one batch each
    task: Any  # theseus_cli.tasks.Task
    x_test: Any
    y_test: Any
    batch_size: int
    max_drop: float | None = None  # None: DEFAULT_DROP of the task's metric
    progress: Any = field(default_factory=NullProgress)  # a line per step (quantise, judge, time)


def has_convolutions(path: Path) -> bool:
    import onnx

    return any(node.op_type in ("Conv", "ConvTranspose") for node in onnx.load(str(path)).graph.node)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _preprocessed(src: Path, work: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        return out
    except Exception:  # noqa: BLE001 — pre-processing is an optimisation; quantise the file as exported
        return src


def write_int8(job: QuantizeJob, out: Path, work: Path) -> str:
    """Quantise ``job.fp32`` into ``out``; return the mode used (static or dynamic)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src = _preprocessed(job.fp32, work)
    if has_convolutions(job.fp32):
        quantize_static(str(src), str(out), _Reader(job.calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=True,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        mode = "static"
    else:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        mode = "dynamic"
    _copy_metadata(job.fp32, out, mode)
    return mode


def _copy_metadata(src: Path, dst: Path, mode: str) -> None:
    """The float file's theseus metadata onto the quantised one (the tools do not keep it), plus the mode."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst))
    del model.metadata_props[:]
    for key, value in {**props, "theseus_quantization": f"int8 {mode}"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))


def calibration_inputs(job: QuantizeJob) -> int:
    return sum(next(iter(feeds.values())).shape[0] for feeds in job.calibration)


def judged(models: dict[str, OnnxTarget], job: QuantizeJob) -> dict[str, Any]:
    """Metric and size of the float and int8 files, and their batch-1 latency timed alternately in this process
    (:func:`onnx_latency_pair`): ``int8_over_float`` is the median of per-round int8/float ratios, with its range."""
    timed = onnx_latency_pair(models, job.x_test[:1], (1,))
    out = {name: {"metric": onnx_metric(m, job.task, job.x_test, job.y_test, job.batch_size),
                  "size_bytes": m.path.stat().st_size, "latency": timed["latency"][name]["1"]}
           for name, m in models.items()}
    out["int8_over_float"] = {"size": out["int8"]["size_bytes"] / max(1, out["float"]["size_bytes"]),
                              "latency_b1": timed["ratios"]["int8"]["1"]}
    return out


def int8_warnings(judgement: dict[str, Any]) -> list[str]:
    """What makes an int8 file not worth shipping though its metric holds: not smaller, or not faster (per-round
    median ratio ≥ 1), on this machine's ONNX Runtime."""
    ratio, warnings = judgement["int8_over_float"], []
    if ratio["size"] >= 1:
        warnings.append(f"the int8 file is not smaller than the float one ({judgement['int8']['size_bytes']:,} against "
                        f"{judgement['float']['size_bytes']:,} bytes)")
    lat = ratio["latency_b1"]
    if lat["median"] >= 1:
        warnings.append(f"the int8 file is not faster than the float one at batch 1 on this CPU (×{lat['median']:.2f} "
                        f"the float time, ×{lat['min']:.2f}–{lat['max']:.2f} over {lat['rounds']} alternating rounds)")
    return warnings


def drop_problem(task, fp: float, q: float, max_drop: float) -> str | None:
    """Why the int8 metric ``q`` is too far from the float one ``fp`` (None if within ``max_drop``)."""
    if task.higher_is_better:
        drop = fp - q
        return None if drop <= max_drop + 1e-9 else f"{task.metric} {fp:.4f} → {q:.4f} (drop {drop:.4f} > {max_drop:g})"
    rise = q / fp - 1 if fp > 0 else float("inf")
    return None if rise <= max_drop + 1e-9 else f"{task.metric} {fp:.2f} → {q:.2f} (+{rise:.1%} > {max_drop:.1%})"


def quantize_onnx(job: QuantizeJob, out: Path) -> dict[str, Any]:
    """Quantise, judge both files on the test split, and move the int8 file to ``out`` only if it passes."""
    max_drop = DEFAULT_DROP[job.task.metric] if job.max_drop is None else job.max_drop
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp)
        int8 = work / "int8.onnx"
        try:
            job.progress.log(f"int8: quantising ({calibration_inputs(job)} calibration inputs for a static graph)")
            mode = write_int8(job, int8, work)
            quantized = open_onnx(int8, 1)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 — the tools raise anything; one line, nothing written
            raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
        job.progress.log(f"int8: {mode} file written; judging float and int8 on the test split, timing them alternately")
        judgement = judged({"float": open_onnx(job.fp32, 1), "int8": quantized}, job)
        fp, q = judgement["float"], judgement["int8"]
        job.progress.log(f"int8: {job.task.metric} {fp['metric']:.4f} float, {q['metric']:.4f} int8")
        problem = drop_problem(job.task, fp["metric"], q["metric"], max_drop)
        if problem:
            raise ExportError(f"int8 export refused, nothing written: {problem} on the test split "
                              f"(--max-metric-drop; {mode} quantisation"
                              + (f", {calibration_inputs(job)} calibration inputs)" if mode == "static" else ")"))
        shutil.move(str(int8), str(out))
    calibrated = calibration_inputs(job) if mode == "static" else 0
    return {"quantization": {"dtype": "int8", "weight_bits": 7, "mode": mode, "calibration_inputs": calibrated,
                             "max_metric_drop": max_drop, "metric_name": job.task.metric, "float": fp, "int8": q,
                             "int8_over_float": judgement["int8_over_float"], "warnings": int8_warnings(judgement),
                             "threads": 1, "metadata_key": ONNX_META_KEY}}


def int8_job(fp32: Path, meta, source: Path, calibration: int, max_drop: float | None, trust_code: bool,
             progress=None) -> QuantizeJob:
    """The job for a target's float export: its recipe's test split (as ``theseus eval`` reads it) to judge on and
    ``calibration`` of its training inputs (the first ones of the recipe's seeded order) to calibrate with."""
    import torch

    from theseus_cli.deploy.evaluate import eval_dataset, setup_from_meta
    from theseus_cli.tasks import get_task

    setup = setup_from_meta(meta, None, source, trust_code)
    ds, cfg = eval_dataset(setup, None, meta.normalization_dict(), meta.input_shape, torch.device("cpu"))
    float_model = open_onnx(fp32, 1)
    n = min(calibration, ds.x_train.shape[0])
    feeds = [float_model.feeds(ds.x_train[torch.arange(s, min(s + cfg.eval_batch_size, n))])
             for s in range(0, n, cfg.eval_batch_size)]
    return QuantizeJob(fp32, feeds, get_task(setup.task), ds.x_test, ds.y_test, cfg.eval_batch_size, max_drop,
                       progress or NullProgress())
