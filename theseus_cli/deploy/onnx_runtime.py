"""An exported target on ONNX Runtime's CPU provider: what an edge device runs, measured as it runs there.

``theseus eval --runtime onnxruntime FILE.onnx`` and ``export --quantize int8`` use this module. A file written by
``theseus export`` carries its :class:`~theseus_cli.target_meta.TargetMeta` in the ONNX ``metadata_props``
(key ``theseus_target``; plain JSON, validated, nothing in it is run), so the file alone says its task, input
shape, normalisation and the recipe whose test split it is judged on — the same input pipeline as
``theseus eval`` of the PyTorch target. Latency is the median wall time of ``session.run`` after warm-up
(:func:`theseus_cli.deploy.profile.time_calls`), with the session's intra-op thread count stated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from theseus_cli.batch import TokenBatch
from theseus_cli.errors import ModelError
from theseus_cli.target_meta import TargetMeta

ONNX_META_KEY = "theseus_target"


def default_threads() -> int:
    """The CPUs this process may use (ONNX Runtime's own default counts physical cores of the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class OnnxTarget:
    """An ONNX Runtime session on an exported target, callable like the PyTorch ``Deployable`` it came from."""

    path: Path
    session: Any
    meta: TargetMeta
    threads: int

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def feeds(self, x) -> dict[str, np.ndarray]:
        """The session's inputs for a batch ``x`` (images, token ids, or a TokenBatch with its mask)."""
        if isinstance(x, TokenBatch):
            arrays = {"input_ids": x.ids.numpy(), "attention_mask": x.mask.numpy()}
        else:
            arrays = {self.input_names[0]: x.numpy()}
        return {name: arrays[name] for name in self.input_names if name in arrays}

    def __call__(self, x) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feeds(x))[0])


def session_for(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def looks_like_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file by its content (a ModelProto opens with its ``ir_version`` field, tag 0x08)
    or, where the content says nothing, its suffix; safetensors and PyTorch files are never taken for one."""
    from theseus_cli.models.build import sniff_format

    if not path.is_file():
        return False
    if sniff_format(path) in ("safetensors", "torch"):
        return False
    with open(path, "rb") as fh:
        first = fh.read(1)
    return first == b"\x08" or path.suffix.lower() == ".onnx"


def check_runtime_fits(path: Path, runtime: str) -> None:
    """:class:`UsageError` (exit 2) when ``path`` is an ONNX file given to PyTorch, or a PyTorch/safetensors file or a
    run directory given to ONNX Runtime: the one-line fix, instead of a confusing error further on."""
    from theseus_cli.errors import UsageError
    from theseus_cli.models.build import sniff_format

    if runtime == "pytorch" and looks_like_onnx(path):
        raise UsageError(f"{path}: this is an ONNX file: add --runtime onnxruntime")
    if runtime == "onnxruntime" and (path.is_dir() or (path.is_file() and sniff_format(path) in ("safetensors", "torch"))):
        what = "a run directory" if path.is_dir() else "a PyTorch/safetensors file, not ONNX"
        raise UsageError(f"{path}: this is {what}: drop --runtime onnxruntime to run it with PyTorch, or export it "
                         "first (theseus export RUN --format onnx) and pass the .onnx file")


def open_onnx(path: str | Path, threads: int | None = None) -> OnnxTarget:
    """Load ``path`` for ONNX Runtime's CPU provider; one-line :class:`ModelError` for a missing file, a file that is
    not ONNX, or one that carries no theseus metadata."""
    import importlib.util

    path = Path(path)
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise ModelError("--runtime onnxruntime needs onnx and onnxruntime: pip install 'theseus-cli[export]'")
    if not path.is_file():
        raise ModelError(f"{path}: ONNX file not found")
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    if ONNX_META_KEY not in props:
        raise ModelError(f"{path}: carries no theseus target metadata (write it with `theseus export --format onnx`)")
    meta = TargetMeta.from_json(props[ONNX_META_KEY], path)
    threads = threads or default_threads()
    try:
        session = session_for(path, threads)
    except Exception as exc:
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    return OnnxTarget(path, session, meta, threads)


def onnx_metric(model: OnnxTarget, task, x, y, batch_size: int) -> float:
    """``task``'s metric over all of ``x`` with the file's outputs (sentence embeddings: the exported graph already
    pools and normalises, so the metric is the cosine of its output to ``y``)."""
    total, count = 0.0, 0.0
    for start in range(0, x.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, x.shape[0]))
        xb, yb = x[idx], (y[idx] if y is not None else None)
        out = model(xb)
        if task.name == "sentence-embedding":
            cos = F.cosine_similarity(out.double(), yb.double(), dim=-1)
            s, c = cos.sum(), cos.shape[0]
        else:
            s, c = task.metric_sums(out, xb, yb)
        total, count = total + float(s), count + float(c)
    return task.finish(total, count)


def onnx_latency(model: OnnxTarget, sample, batches: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Median / p90 ms of ``session.run`` on ``b`` copies of one example, for each ``b`` in ``batches``."""
    from theseus_cli.deploy.profile import repeat_example, time_calls

    out = {}
    for b in batches:
        feeds = model.feeds(repeat_example(sample[:1], b))
        out[str(b)] = time_calls(lambda feeds=feeds: model.session.run(None, feeds), b)
    return out


def onnx_latency_pair(models: dict[str, OnnxTarget], sample, batches: tuple[int, ...],
                      budget_s: float | None = None) -> dict[str, Any]:
    """Every file of ``models`` (name → session; the first is the reference) timed in one process in alternating
    rounds at each batch size (:func:`theseus_cli.deploy.interleave.interleaved`, ``budget_s`` its budget):
    ``{"latency": {name: {b: summary}}, "ratios": {name: {b: {"median", "min", "max", "rounds"}}},
    "round_medians_ms": {b: [...]}}``, each ratio the file's time over the reference's; the round medians let a
    caller compare any two files of the run (:func:`theseus_cli.deploy.interleave.pair_ratio`)."""
    from theseus_cli.deploy.interleave import interleaved
    from theseus_cli.deploy.profile import repeat_example

    names = list(models)
    latency: dict[str, dict] = {n: {} for n in names}
    ratios: dict[str, dict] = {n: {} for n in names[1:]}
    rounds: dict[str, list] = {}
    for b in batches:
        x = repeat_example(sample[:1], b)
        calls = {}
        for name, model in models.items():
            feeds = model.feeds(x)
            calls[name] = lambda model=model, feeds=feeds: model.session.run(None, feeds)
        res = interleaved(calls, b, budget_s=budget_s)
        for name in names:
            latency[name][str(b)] = res["models"][name]
        for name in names[1:]:
            ratios[name][str(b)] = {**res["ratios"][name], "rounds": res["rounds"]}
        rounds[str(b)] = res["round_medians_ms"]
    return {"latency": latency, "ratios": ratios, "round_medians_ms": rounds}
