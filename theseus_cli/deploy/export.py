"""``theseus export``: a converted target as a deployable file, checked against PyTorch.

Formats:

* ``onnx`` — one ``.onnx`` file with a dynamic batch axis (and sequence axis for token
  models). The ``torch.export``-based exporter is tried first; a model it cannot capture
  (e.g. ``nn.RNN`` under symbolic shapes) falls back to the TorchScript-based exporter. The
  report says which one wrote the file. The file's ``metadata_props`` hold ``theseus``:
  the task, input shape, normalisation and tokenizer a deployment must reproduce.
* ``torchscript`` — ``torch.jit.trace`` saved with ``torch.jit.save``; the same metadata is
  an extra file ``theseus.json`` inside the archive. Tracing records one control-flow path,
  which the parity check below exposes when it matters.
* ``hf`` — a ``save_pretrained`` directory for transformers targets, with the tokenizer.
  A target that is a plain transformers architecture (architecture transfer onto
  ``hf:...``) loads with ``AutoModelFor….from_pretrained(dir)``. A target with replaced
  modules also writes ``modeling_theseus.py``, a subclass of the guide's class that
  re-applies the replacement plan (from ``config.json``), and loads with
  ``from_pretrained(dir, trust_remote_code=True)`` where ``theseus_cli`` is installed.

Every export is verified before it is put in place: the exported model is loaded back
(ONNX Runtime, ``torch.jit.load``, ``from_pretrained``) and run on seeded sample inputs of
several batch sizes (and sequence lengths, with padding where the task pads), and its
outputs must match PyTorch's within ``atol + rtol·|expected|``. Otherwise nothing is
written and the error gives the largest difference (exit code 11). Files are written
to a temporary name and renamed, so an existing export is replaced whole or not at all.

The exported graph computes what the task evaluates: logits for classification and
causal LM, the pooled, L2-normalised sentence embedding for ``sentence-embedding``.
"""

from __future__ import annotations

import json
import warnings
import os
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from theseus_cli.artifacts import atomic_write, load_target
from theseus_cli.deploy.onnx_runtime import ONNX_META_KEY
from theseus_cli.deploy.parity import Deployable, check_parity, quiet_exporters, sample_inputs
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.errors import ExportError, OutputError
from theseus_cli.target_meta import TargetMeta

FORMATS = ("onnx", "torchscript", "hf")
DEFAULT_NAME = {"onnx": "target.onnx", "torchscript": "target.torchscript.pt", "hf": "hf"}
INT8_NAME = "target.int8.onnx"
ONNX_LIMIT = 2 * 1024**3  # protobuf's file limit: larger models would need external data files


def _meta_summary(meta: TargetMeta) -> dict[str, Any]:
    return {"task": meta.task, "input_shape": meta.input_shape,
            "normalization": meta.normalization_dict(),
            "tokenizer": meta.tokenizer, "num_classes": meta.num_classes, "recipe_hash": meta.recipe_hash,
            "theseus_version": meta.theseus_version}


def _names(inputs: tuple[torch.Tensor, ...]) -> list[str]:
    if len(inputs) == 1:
        return ["pixel_values" if inputs[0].is_floating_point() else "input_ids"]
    return ["input_ids", "attention_mask"]


def _onnx_export(wrapper: Deployable, example, tmp: Path, opset: int, kind: str, meta: dict) -> int:
    """Write ``tmp`` with the ``kind`` exporter at ``opset``; returns the opset the written file declares."""
    import onnx

    names = _names(example)
    tokens = not example[0].is_floating_point()
    with quiet_exporters():
        if kind == "dynamo":
            from torch.export import Dim

            batch = Dim("batch", min=1, max=65536)
            axes = {0: batch, 1: Dim("sequence", min=2, max=example[0].shape[1])} if tokens else {0: batch}
            torch.onnx.export(wrapper, example, str(tmp), dynamo=True, input_names=names, output_names=["output"],
                              dynamic_shapes={n: axes for n in ("x", "attention_mask")[: len(example)]},
                              opset_version=opset, external_data=False)
        else:
            axes = {0: "batch", 1: "sequence"} if tokens else {0: "batch"}
            out_axes = {0: "batch", 1: "sequence"} if tokens and meta.task == "causal-lm" else {0: "batch"}
            torch.onnx.export(wrapper, example, str(tmp), dynamo=False, input_names=names, output_names=["output"],
                              dynamic_axes={**{n: axes for n in names}, "output": out_axes}, opset_version=opset)
    model = onnx.load(str(tmp))
    written = onnx_opset(model)
    if written != opset:  # the torch.export-based exporter writes the opset it supports and may ignore the one asked
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:
            raise ExportError(f"the {kind} exporter wrote opset {written}, and converting it to opset {opset} failed: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    _strip_debug_info(model.graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "theseus", json.dumps(_meta_summary(meta), sort_keys=True)
    full = model.metadata_props.add()  # the whole TargetMeta: what `eval --runtime onnxruntime` evaluates it on
    full.key, full.value = ONNX_META_KEY, meta.to_json()
    onnx.save(model, str(tmp))
    return onnx_opset(model)


def _strip_debug_info(graph) -> None:
    """Drop what the exporter records per node for debugging (source stack traces, FX names: ``pkg.torch.*`` props
    and doc strings). On a small edge target it was most of the file (54 KB of 88 KB for 4,163 parameters); ONNX
    Runtime never reads it."""
    graph.doc_string = ""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:  # control-flow bodies (If/Loop/Scan) are graphs of their own
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                _strip_debug_info(sub)


def onnx_opset(model) -> int:
    """The default-domain (``ai.onnx``) opset an ONNX model declares."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _run_onnx(path: Path, names: list[str]):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    return lambda inputs: torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs) if n in feeds})[0])


def export_onnx(wrapper, cases, out: Path, meta, atol, rtol, opset: int = 18, exporter: str = "auto") -> dict[str, Any]:
    """Under ``auto``, an exporter whose file fails the parity check (e.g. a sequence axis the capture made static)
    counts as failed, and the next one is tried."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install 'theseus-cli[export]'")
    size = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    if size >= ONNX_LIMIT:
        raise ExportError(f"the target's weights take {size / 1024**3:.1f} GiB, over ONNX's 2 GiB single-file limit")
    result: dict[str, Any] = {"tried": []}

    def write(tmp: Path):
        for kind in (["dynamo", "torchscript"] if exporter == "auto" else [exporter]):
            try:
                declared = _onnx_export(wrapper, cases[0], tmp, opset, kind, meta)
            except Exception as exc:
                result["tried"].append(f"{kind}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
                continue
            try:
                run = _run_onnx(tmp, _names(cases[0]))
            except Exception as exc:  # e.g. a node the opset conversion left invalid
                result["tried"].append(f"{kind}: ONNX Runtime does not load the file: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:200]}")
                continue
            try:
                result["parity"] = check_parity(run, wrapper, cases, atol, rtol, f"the ONNX file ({kind} exporter) under ONNX Runtime")
            except ExportError as exc:
                result["tried"].append(f"{kind}: {exc}")
                continue
            result["exporter"], result["opset"] = kind, declared
            return
        raise ExportError("ONNX export failed — " + "; ".join(result["tried"]))

    atomic_write(out, write)
    return {**result, "runtime": "onnxruntime " + __import__("onnxruntime").__version__}


def export_torchscript(wrapper, cases, out: Path, meta, atol, rtol) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def write(tmp: Path):
        try:
            with quiet_exporters():
                traced = torch.jit.trace(wrapper, cases[0], check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp), _extra_files={"theseus.json": json.dumps(_meta_summary(meta))})
        except Exception as exc:
            raise ExportError(f"TorchScript tracing failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        with warnings.catch_warnings():  # torch deprecates TorchScript in favour of torch.export: the user asked
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")  # for it by name
            loaded = torch.jit.load(str(tmp))
        result["parity"] = check_parity(lambda inputs: loaded(*inputs), wrapper, cases, atol, rtol, "the TorchScript module")

    atomic_write(out, write)
    return result


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """``theseus export``'s flags besides the target and the format."""

    out: Optional[str | Path] = None  # default: the run directory's target.<format>
    overwrite: bool = False
    atol: float = 1e-4  # parity with PyTorch, checked on seeded inputs of several shapes
    rtol: float = 1e-3
    opset: int = 18
    exporter: str = "auto"
    trust_code: bool = False  # build an architecture the metadata names even if not vouched for (load_target)
    quantize: Optional[str] = None  # "int8" (onnx only): see theseus_cli.deploy.quantize
    max_metric_drop: Optional[float] = None  # int8: allowed metric loss (None: 1 point; perplexity 2 %)
    calibration: int = 256  # int8 static quantisation: training inputs used to calibrate activation ranges
    progress: Progress = field(default_factory=NullProgress)  # int8: a line per step (export, quantise, judge)


def _export_int8(wrapper, cases, out: Path, source: Path, o: ExportOptions) -> dict[str, Any]:
    """The float ONNX export (parity-checked as usual) into a scratch folder, then its int8 form into ``out``."""
    from theseus_cli.deploy.quantize import int8_job, quantize_onnx

    meta = wrapper.model.theseus_meta
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.fp32.") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        o.progress.log("int8: exporting the float ONNX file and checking it against PyTorch")
        result = export_onnx(wrapper, cases, fp32, meta, o.atol, o.rtol, o.opset, o.exporter)
        o.progress.log("int8: loading the recipe's data (calibration and test split)")
        job = int8_job(fp32, meta, source, o.calibration, o.max_metric_drop, o.trust_code, o.progress)
        return {**result, **quantize_onnx(job, out)}


def _export_decoder_onnx(model: nn.Module, wrapper, cases, out: Path, o: ExportOptions) -> dict[str, Any]:
    """The whole-sequence file and, for a decoder whose every sequence mixer keeps a state, the prefill and
    decode-step graphs beside it (:mod:`theseus_cli.deploy.streaming`): all checked before any is written."""
    from theseus_cli.deploy.streaming import (check_streaming, streaming_modules, streaming_paths, write_graphs,
                                              write_metadata)

    meta = model.theseus_meta
    modules, why = streaming_modules(model)
    if modules is None:
        return {**export_onnx(wrapper, cases, out, meta, o.atol, o.rtol, o.opset, o.exporter),
                "streaming": {"written": False, "reason": why}}
    final = streaming_paths(out)
    clash = next((p for p in final.values() if p.exists() and not o.overwrite), None)
    if clash is not None:
        raise OutputError(f"{clash}: exists (use --overwrite to replace it)")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.stream.") as tmp:
        try:
            with quiet_exporters():
                paths, layout, prompt = write_graphs(model, modules, Path(tmp), o.opset)
            parity = check_streaming(model, modules, paths, prompt, o.atol, o.rtol)
        except AssertionError as exc:
            raise ExportError(f"the streaming graphs do not reproduce PyTorch's step logits: {exc}") from None
        except Exception as exc:
            raise ExportError(f"the streaming export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        for graph in paths.values():
            write_metadata(graph, layout, {ONNX_META_KEY: meta.to_json()})
        result = export_onnx(wrapper, cases, out, meta, o.atol, o.rtol, o.opset, o.exporter)
        for kind, graph in paths.items():
            os.replace(graph, final[kind])
    return {**result, "streaming": {"written": True, **{k: str(p) for k, p in final.items()}, "state": layout,
                                    "parity": parity}}


def export_target(path: str | Path, fmt: str = "onnx", options: ExportOptions | None = None) -> dict[str, Any]:
    """Export the target in ``path`` (a run directory or ``target.safetensors``); verify; return what was written."""
    o = options or ExportOptions()
    out, overwrite, atol, rtol, opset, exporter, trust_code = (o.out, o.overwrite, o.atol, o.rtol, o.opset, o.exporter,
                                                               o.trust_code)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if o.quantize not in (None, "int8"):
        raise ExportError(f"--quantize {o.quantize!r}: the one choice is int8")
    if o.quantize and fmt != "onnx":
        raise ExportError(f"--quantize int8 applies to --format onnx, not {fmt}")
    path = Path(path)
    model = load_target(path, "cpu", trust_code)
    meta = model.theseus_meta
    run_dir = path if path.is_dir() else path.parent
    out = Path(out) if out is not None else run_dir / (INT8_NAME if o.quantize else DEFAULT_NAME[fmt])
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists (use --overwrite to replace it)")
    if fmt != "hf" and out.is_dir():
        raise OutputError(f"{out}: is a directory; --out names the {fmt} file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    task = meta.task
    wrapper = Deployable(model, task).eval()
    cases = sample_inputs(model, meta)
    if fmt == "onnx" and o.quantize:
        result = _export_int8(wrapper, cases, out, path, o)
    elif fmt == "onnx" and task == "causal-lm":
        result = _export_decoder_onnx(model, wrapper, cases, out, o)
    elif fmt == "onnx":
        result = export_onnx(wrapper, cases, out, meta, atol, rtol, opset, exporter)
    elif fmt == "torchscript":
        result = export_torchscript(wrapper, cases, out, meta, atol, rtol)
    else:
        from theseus_cli.deploy.export_hf import export_hf

        result = export_hf(model, wrapper, cases, out, meta, atol, rtol)
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    return {"format": fmt, "out": str(out), "size_bytes": size, "task": task, "inputs": _names(cases[0]),
            "deployment": _meta_summary(meta), **result}
