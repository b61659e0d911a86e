"""``theseus eval``: quality and cost of one model, guide checkpoint or converted target.

A converted target (a run directory or its ``target.safetensors``) describes itself: its
architecture, task, data settings and input normalisation come from the file's metadata.
A guide checkpoint is a bare state dict, so ``--recipe`` must say its architecture and data.
``--data`` swaps the data source while keeping every other data setting (resize, canvas,
tokenizer, sequence length, limits); images are normalised with the statistics the target
recorded, so a target sees inputs scaled as in training.

The metric is the task's (accuracy, perplexity, or for sentence embeddings the cosine to
the guide's embeddings, which needs the guide: the recipe's checkpoint or its ``hf:``
directory's weights) on the test split. Params, FLOPs per example and latency come from
:mod:`theseus_cli.deploy.profile`.
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from theseus_cli.data.sources import DATA_SOURCES, text_sources
from theseus_cli.errors import DataError, ModelError, RecipeError
from theseus_cli.config.recipe import DataConfig, GuideConfig, Recipe, load_recipe, parse_recipe


def _is_target(path: Path) -> bool:
    from theseus_cli.artifacts import TARGET_FILE

    if path.is_dir():
        return (path / TARGET_FILE).is_file()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "theseus" in (f.metadata() or {})
    except Exception:
        return False


def data_override(cfg: DataConfig, spec: str) -> DataConfig:
    """``cfg`` with its source replaced by ``spec``: a built-in source name, or a path whose kind is inferred
    (a ``.npz`` file, a ``.txt`` file, a folder of idx files, or an image-class folder tree)."""
    builtin = [name for name, source in DATA_SOURCES.items() if not source.needs_path]
    if spec in builtin:
        source, path = spec, None
    else:
        p = Path(spec)
        if not p.exists():
            raise DataError(f"--data {spec}: neither a built-in source ({', '.join(builtin)}) nor an existing path")
        if p.is_file():
            source = {".npz": "npz", ".txt": "text"}.get(p.suffix)
            if source is None:
                raise DataError(f"--data {spec}: files must be .npz (images) or .txt (text); a folder holds idx files or class folders")
        else:
            names = [f.name for f in p.iterdir()]
            source = "idx" if any("-ubyte" in n for n in names) else "imagefolder"
        path = str(p.resolve())
    fields = cfg.model_dump()
    fields.update(source=source, path=path)
    try:
        return DataConfig.model_validate(fields)
    except ValueError as exc:
        raise DataError(f"--data {spec}: {' '.join(str(exc).split())}") from None


@dataclass(frozen=True)
class EvalSetup:
    """What evaluating a model needs to know besides its weights: task, data, seed, and the guide (whose
    embeddings are the sentence-embedding metric's reference). From a recipe, or from a transported target's
    record of its transport recipe."""

    task: str
    data: DataConfig
    seed: int
    guide: GuideConfig
    arch: str  # what the report names as the evaluated architecture

    @classmethod
    def of(cls, recipe: Recipe, kind: str) -> "EvalSetup":
        arch = recipe.target.arch if recipe.target and kind == "target" else recipe.guide.arch
        return cls(recipe.task, recipe.data, recipe.seed, recipe.guide, arch)


def _guide_for_embeddings(recipe: EvalSetup, device: torch.device):
    from theseus_cli.models.build import load_guide
    from theseus_cli.models.hf import default_checkpoint

    from theseus_cli.models.build import resolve_checkpoint
    from theseus_cli.models.checkpoint_fit import CheckpointFit

    ckpt = recipe.guide.checkpoint or default_checkpoint(recipe.guide.arch)
    if ckpt is None:
        raise ModelError("sentence-embedding: the metric is the cosine to the guide's embeddings, and the recipe "
                         "names no guide checkpoint (guide.checkpoint or an hf: directory)")
    return load_guide(recipe.guide.arch, recipe.guide.kwargs, resolve_checkpoint(ckpt), recipe.seed, recipe.task,
                      CheckpointFit.of(recipe.guide)).to(device).eval()


def load_for_eval(model_path: str | Path, recipe_path: str | Path | None, device: torch.device, trust_code: bool = False):
    """(model, recipe, kind, normalisation) for a converted target or a guide checkpoint.

    A target's own metadata names its architecture and, without ``--recipe``, its recipe; what either names is
    built only where this installation vouches for it, or with ``trust_code`` (``--trust-target``)."""
    from theseus_cli.models.build import load_guide
    from theseus_cli.models.checkpoint_fit import CheckpointFit
    from theseus_cli.artifacts import load_target, unfinished
    from theseus_cli.rundir import unfinished_run

    path = Path(model_path)
    if not path.exists():
        raise ModelError(f"{path}: model file or run directory not found")
    if unfinished_run(path):
        raise unfinished(path)
    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    if _is_target(path):
        model = load_target(path, str(device), trust_code)
        meta = model.theseus_meta
        return model, setup_from_meta(meta, recipe, path, trust_code), "target", meta.normalization_dict()
    if recipe is None:
        raise RecipeError(f"{path}: not a converted target, so --recipe must give the guide's architecture and data")
    if recipe.guide.head == "reset":  # its new head is fitted on the recipe's data, as a conversion fits it
        from theseus_cli.training.session import open_session

        model = open_session(recipe, path, str(device)).guide
    else:
        model = load_guide(recipe.guide.arch, recipe.guide.kwargs, path, recipe.seed, recipe.task,
                           CheckpointFit.of(recipe.guide))
    return model.to(device).eval(), EvalSetup.of(recipe, "guide"), "guide", None


def setup_from_meta(meta, recipe: Recipe | None, source: Path, trust_code: bool) -> EvalSetup:
    """What a converted target (its :class:`TargetMeta`, from the weights file or an exported ONNX file) is
    evaluated on: ``recipe`` if given, else the recipe it records (a transported target: its transport recipe)."""
    from theseus_cli.artifacts import check_vouched

    if recipe is None and meta.transport is not None:  # B′ of `theseus transport`: its data is the transport recipe's
        from theseus_cli.config.transport import TransportRecipe

        tr = TransportRecipe.model_validate(meta.transport.recipe)
        guide = GuideConfig(arch=meta.guide.arch, kwargs=meta.guide.kwargs)
        return EvalSetup(tr.task, tr.data, tr.seed, guide, meta.guide.arch)
    if recipe is None:
        recipe = parse_recipe(meta.recipe, f"{source} (recorded recipe)")
        if recipe.task == "sentence-embedding":  # the metric needs the guide the recorded recipe names
            check_vouched(recipe.guide.arch, trust_code, source)
    return EvalSetup.of(recipe, "target")


def eval_dataset(setup: EvalSetup, data: str | None, normalization, input_shape, dev: torch.device):
    """The test split ``setup`` names (``data`` swaps its source), images normalised with the target's
    ``normalization``; for sentence embeddings ``y_test`` holds the guide's embeddings."""
    from theseus_cli.data.dataset import load_dataset
    from theseus_cli.training.loops import embed

    cfg = data_override(setup.data, data) if data else setup.data
    ds = load_dataset(cfg, setup.seed, setup.task, setup.guide.arch,
                      normalization=normalization if normalization and cfg.source not in text_sources() else None)
    if setup.task == "sentence-embedding":
        ds.y_test = embed(_guide_for_embeddings(setup, dev), ds.x_test, cfg.eval_batch_size, dev)
    if ds.kind == "image" and input_shape is not None and tuple(ds.input_shape) != tuple(input_shape):
        raise DataError(f"--data: images of shape {tuple(ds.input_shape)}, but the target was converted for "
                        f"{tuple(input_shape)} (set image_size / channels / canvas with --recipe)")
    return ds, cfg


def _check_batches(model, ds, cfg: DataConfig, latency_batches: tuple[int, ...], dev: torch.device) -> None:
    """The evaluation batch and the largest latency batch fit the device (``--batch 100000000`` is refused here)."""
    from theseus_cli.training import memory

    memory.require_batches(model, ds.x_test[:1].to(dev), {
        "data.eval_batch_size": min(cfg.eval_batch_size, ds.x_test.shape[0]), "--batch": max(latency_batches)}, dev)


def evaluate_model(model_path: str | Path, recipe_path: str | Path | None = None, data: str | None = None,
                   device: str = "auto", batches: tuple[int, ...] = (1, 64), latency: bool = True,
                   trust_code: bool = False, against: str | Path | None = None) -> dict[str, Any]:
    """The task metric on the test split, params, FLOPs per example and latency of one model (``trust_code``: see
    :func:`load_for_eval`). With ``against`` (another target or guide checkpoint, e.g. the guide), both are timed in
    this process in alternating rounds and ``result["against"]`` holds the other's latency and the per-round ratio
    of this model's time to the other's (:mod:`theseus_cli.deploy.interleave`)."""
    from theseus_cli.artifacts import versions
    from theseus_cli.deploy.profile import profile_model, profile_pair
    from theseus_cli.training.session import check_classes, check_vocabulary, resolve_device
    from theseus_cli.tasks import get_task
    from theseus_cli.training.loops import evaluate

    dev = resolve_device(device)
    model, recipe, kind, normalization = load_for_eval(model_path, recipe_path, dev, trust_code)
    meta = getattr(model, "theseus_meta", None)
    ds, cfg = eval_dataset(recipe, data, normalization, meta.input_shape if meta is not None else None, dev)
    check_vocabulary(model, ds)
    task = get_task(recipe.task)
    check_classes(model, ds, f"the {kind}")
    _check_batches(model, ds, cfg, batches, dev)
    value = evaluate(model, task, ds.x_test, ds.y_test, cfg.eval_batch_size, dev)
    if against is None:
        prof, other = profile_model(model, ds.x_test[:1], dev, batches, latency), None
    else:
        other_model, _, other_kind, _ = load_for_eval(against, recipe_path, dev, trust_code)
        pair = profile_pair(other_model, model, ds.x_test[:1], dev, batches, latency)
        prof = pair["target"]
        other = {"model": str(against), "kind": other_kind, **pair["guide"], "ratios": _pair_ratios(pair["ratios"])}
    return {"model": str(model_path), "kind": kind, "task": recipe.task,
            "arch": recipe.arch,
            "data": ds.summary(), "split": "test",
            "metric": {"name": task.metric, "value": value, "higher_is_better": task.higher_is_better},
            **prof, **({"against": other} if other is not None else {}), "device": str(dev), "versions": versions()}


def _pair_ratios(ratios: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"1": {"median", "min", "max", "rounds"}, …}`` from :func:`profile_pair`'s ``latency_b<N>`` keys."""
    out = {}
    for key, value in ratios.items():
        if key.startswith("latency_b") and key[9:].isdigit():
            b = key[9:]
            lo, hi = ratios[f"latency_b{b}_range"]
            out[b] = {"median": value, "min": lo, "max": hi, "rounds": ratios[f"latency_b{b}_rounds"]}
    return out


def evaluate_onnx(path: str | Path, recipe_path: str | Path | None = None, data: str | None = None,
                  batches: tuple[int, ...] = (1, 64), latency: bool = True, threads: int | None = None,
                  trust_code: bool = False, against: str | Path | None = None) -> dict[str, Any]:
    """``theseus eval --runtime onnxruntime``: the task metric on the test split of an exported ``.onnx`` file run by
    ONNX Runtime's CPU provider, its file size, and batch-1 / batch-N latency (see
    :mod:`theseus_cli.deploy.onnx_runtime`). The data, normalisation and metric are those of ``theseus eval`` on
    the PyTorch target, read from the metadata the export wrote into the file. With ``against`` (another exported
    ``.onnx`` file, e.g. the guide's), both run in alternating rounds with the same thread count, and
    ``result["against"]`` holds the other's latency and the per-round ratio of this file's time to the other's."""
    import onnxruntime as ort

    from theseus_cli.artifacts import versions
    from theseus_cli.deploy.onnx_runtime import onnx_latency, onnx_latency_pair, onnx_metric, open_onnx
    from theseus_cli.tasks import get_task

    model = open_onnx(path, threads)
    meta = model.meta
    setup = setup_from_meta(meta, load_recipe(recipe_path) if recipe_path is not None else None, model.path, trust_code)
    ds, cfg = eval_dataset(setup, data, meta.normalization_dict(), meta.input_shape, torch.device("cpu"))
    task = get_task(setup.task)
    value = onnx_metric(model, task, ds.x_test, ds.y_test, cfg.eval_batch_size)
    out = {"model": str(path), "kind": "target", "task": setup.task, "arch": setup.arch, "data": ds.summary(),
           "split": "test", "metric": {"name": task.metric, "value": value, "higher_is_better": task.higher_is_better},
           "size_bytes": model.path.stat().st_size, "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
           "threads": model.threads, "versions": versions()}
    if latency and against is None:
        out["latency"] = onnx_latency(model, ds.x_test[:1], batches)
    elif latency:
        other = open_onnx(against, model.threads)
        timed = onnx_latency_pair({"against": other, "model": model}, ds.x_test[:1], batches)
        out["latency"] = timed["latency"]["model"]
        out["against"] = {"model": str(against), "kind": "onnx", "size_bytes": other.path.stat().st_size,
                          "latency": timed["latency"]["against"], "ratios": timed["ratios"]["model"]}
    if latency:
        out["latency_device"] = f"cpu ({model.threads} intra-op threads)"
        out["latency_runtime"] = out["runtime"]
    return out
