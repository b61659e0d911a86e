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

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from theseus_cli.artifacts import atomic_write, current_umask, load_target
from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.deploy.onnx_runtime import ONNX_META_KEY
from theseus_cli.errors import ExportError, OutputError
from theseus_cli.target_meta import TargetMeta

UNKNOWN_VOCAB = 1000  # token ids drawn below this when a model has no input embedding to read the vocabulary from

FORMATS = ("onnx", "torchscript", "hf")
DEFAULT_NAME = {"onnx": "target.onnx", "torchscript": "target.torchscript.pt", "hf": "hf"}
INT8_NAME = "target.int8.onnx"
ONNX_LIMIT = 2 * 1024**3  # protobuf's file limit: larger models would need external data files


class Deployable(nn.Module):
    """The target as a plain tensor function of its inputs: what the task evaluates."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from theseus_cli.models.hf import model_output
        from theseus_cli.tasks import sentence_embedding

        if attention_mask is None and self.task == "causal-lm":
            # the same as no mask for the model; passing it keeps transformers off its packed-sequence detection
            # (torch.diff over positions), which the TorchScript-based ONNX exporter cannot export
            attention_mask = torch.ones_like(x)
        batch = TokenBatch(x, attention_mask) if attention_mask is not None else x
        out = model_output(run_model(self.model, batch))
        if self.task == "sentence-embedding":
            return sentence_embedding(out, batch)
        return out


def _meta_summary(meta: TargetMeta) -> dict[str, Any]:
    return {"task": meta.task, "input_shape": meta.input_shape,
            "normalization": meta.normalization_dict(),
            "tokenizer": meta.tokenizer, "num_classes": meta.num_classes, "recipe_hash": meta.recipe_hash,
            "theseus_version": meta.theseus_version}


def sample_inputs(model: nn.Module, meta: TargetMeta, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Seeded inputs of several batch sizes (and sequence lengths): the first is the export example."""
    g = torch.Generator().manual_seed(seed)
    shape = list(meta.input_shape)
    task = meta.task
    if task == "classification" and len(shape) != 1:
        return [(torch.randn(b, *shape, generator=g),) for b in (2, 1, 5)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = emb.num_embeddings if emb is not None else UNKNOWN_VOCAB
    t = shape[0]
    cases = []
    # an odd length too: a capture that froze a length-dependent shape (padding to a multiple) fails there
    for b, length in ((2, t), (1, t), (3, max(2, t // 2)), (2, max(2, t - 3 if t % 2 == 0 else t - 2))):
        ids = torch.randint(0, vocab, (b, length), generator=g)
        if task == "sentence-embedding":
            mask = torch.ones_like(ids)
            if b > 1:
                mask[0, length - max(1, length // 3):] = 0  # right padding on one row
            cases.append((ids, mask))
        else:
            cases.append((ids,))
    return cases


def _names(inputs: tuple[torch.Tensor, ...]) -> list[str]:
    if len(inputs) == 1:
        return ["pixel_values" if inputs[0].is_floating_point() else "input_ids"]
    return ["input_ids", "attention_mask"]


def _compare(expected: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    got = torch.as_tensor(got).to(expected.dtype)
    if got.shape != expected.shape:
        return float("inf"), False
    diff = (got - expected).abs()
    return float(diff.max()) if diff.numel() else 0.0, bool((diff <= atol + rtol * expected.abs()).all())


def _check(run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], wrapper: Deployable,
           cases: list[tuple[torch.Tensor, ...]], atol: float, rtol: float, what: str) -> dict[str, Any]:
    worst, checked = 0.0, []
    for inputs in cases:
        with torch.no_grad():
            expected = wrapper(*inputs)
        try:
            with torch.no_grad(), _quiet():
                got = run(inputs)
        except Exception as exc:
            raise ExportError(f"{what} fails on inputs of shape {tuple(inputs[0].shape)}: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        diff, ok = _compare(expected, got, atol, rtol)
        worst = max(worst, diff)
        checked.append(list(inputs[0].shape))
        if not ok:
            raise ExportError(f"{what} differs from PyTorch on inputs of shape {tuple(inputs[0].shape)}: "
                              f"max |Δ| {diff:.3g} > atol {atol:g} + rtol {rtol:g}·|expected| (nothing was written)")
    return {"inputs": checked, "max_abs_diff": worst, "atol": atol, "rtol": rtol, "passed": True}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, warnings and (from C++, on failure) whole graphs of their own; the CLI owns
    stdout (``--json``) and stderr. Both are redirected at the file-descriptor level while they run."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = []
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        except OSError:  # no real descriptors (embedded use): Python-level redirection only
            pass
        try:
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _onnx_export(wrapper: Deployable, example, tmp: Path, opset: int, kind: str, meta: dict) -> int:
    """Write ``tmp`` with the ``kind`` exporter at ``opset``; returns the opset the written file declares."""
    import onnx

    names = _names(example)
    tokens = not example[0].is_floating_point()
    with _quiet():
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
                result["parity"] = _check(run, wrapper, cases, atol, rtol, f"the ONNX file ({kind} exporter) under ONNX Runtime")
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
            with _quiet():
                traced = torch.jit.trace(wrapper, cases[0], check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp), _extra_files={"theseus.json": json.dumps(_meta_summary(meta))})
        except Exception as exc:
            raise ExportError(f"TorchScript tracing failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        loaded = torch.jit.load(str(tmp))
        result["parity"] = _check(lambda inputs: loaded(*inputs), wrapper, cases, atol, rtol, "the TorchScript module")

    atomic_write(out, write)
    return result


def _modeling_file(base: str) -> str:
    return f'''"""Written by `theseus export --format hf`: a {base} some of whose modules theseus replaced.

The replacement plan is ``config.theseus_entries``; the new modules come from theseus_cli
(pip install theseus-cli), then transformers loads the saved weights into them.
"""

from transformers import {base} as _Base

from theseus_cli.surgery import PlanEntry, apply_entries


class Theseus{base}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_entries(self, [PlanEntry.from_dict(e) for e in config.theseus_entries])
'''


def export_hf(model: nn.Module, wrapper, cases, out: Path, meta, atol, rtol) -> dict[str, Any]:
    import transformers

    from theseus_cli.models.hf import HEADS

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ExportError(f"--format hf needs a transformers target; this one is a {type(model).__name__} "
                          "(export onnx or torchscript instead)")
    task = meta.task
    auto = HEADS[task]
    entries = meta.entries
    base = type(model).__name__
    config = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if entries:
            config.theseus_entries = entries
            config.auto_map = {auto: f"modeling_theseus.Theseus{base}"}
            (tmp / "modeling_theseus.py").write_text(_modeling_file(base))
        with _quiet():
            model.save_pretrained(str(tmp))
        tokenizer = meta.tokenizer
        if tokenizer:
            from theseus_cli.data.text import load_tokenizer

            load_tokenizer(tokenizer, meta.guide.arch).save_pretrained(str(tmp))
        try:
            with _quiet():
                loaded = getattr(transformers, auto).from_pretrained(str(tmp), trust_remote_code=bool(entries),
                                                                      local_files_only=True).eval()
        except Exception as exc:
            raise ExportError(f"the saved directory does not load with {auto}.from_pretrained: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        again = Deployable(loaded, task)
        parity = _check(lambda inputs: again(*inputs).detach(), wrapper, cases, atol, rtol, f"{auto}.from_pretrained")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for attr in ("theseus_entries", "auto_map"):
            if entries and hasattr(config, attr):
                delattr(config, attr)
    return {"parity": parity, "load_with": f"transformers.{auto}.from_pretrained(dir"
            + (", trust_remote_code=True)" if entries else ")"), "remote_code": bool(entries)}


def _replace_dir(new: Path, out: Path) -> None:
    """Put directory ``new`` at ``out``: an old export there is swapped out by renames, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    os.chmod(out, 0o777 & ~current_umask())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _export_int8(wrapper, cases, out: Path, source: Path, o: ExportOptions) -> dict[str, Any]:
    """The float ONNX export (parity-checked as usual) into a scratch folder, then its int8 form into ``out``."""
    from theseus_cli.deploy.quantize import int8_job, quantize_onnx

    meta = wrapper.model.theseus_meta
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.fp32.") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        result = export_onnx(wrapper, cases, fp32, meta, o.atol, o.rtol, o.opset, o.exporter)
        job = int8_job(fp32, meta, source, o.calibration, o.max_metric_drop, o.trust_code)
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
            with _quiet():
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
        result = export_hf(model, wrapper, cases, out, meta, atol, rtol)
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    return {"format": fmt, "out": str(out), "size_bytes": size, "task": task, "inputs": _names(cases[0]),
            "deployment": _meta_summary(meta), **result}
