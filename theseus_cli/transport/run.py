"""``theseus transport`` as one library call: load A, A′, B and the data; map; choose α; write B′ and the report.

Data: the recipe's ``data`` is the fine-tuning task's. A seeded permutation of its training
split gives the calibration inputs (labels unused) and, disjoint from them, the validation
examples that choose α; the test split measures A, A′, B and B′. ``--calib`` / ``--val`` take the
calibration inputs / the validation examples from another source (a built-in name or a path,
as ``theseus eval --data``), normalised like the task data.

Output: ``OUT/target.safetensors`` (B′ in the theseus target format, so ``load_target``,
``theseus eval`` and ``theseus export`` work on it) and ``OUT/report.json``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from theseus_cli.models.build import load_guide
from theseus_cli.artifacts import REPORT_FILE, TARGET_FILE, save_target, write_json
from theseus_cli.batch import run_model
from theseus_cli.data.dataset import load_dataset
from theseus_cli.data.sources import text_sources
from theseus_cli.errors import DataError
from theseus_cli.deploy.evaluate import data_override
from theseus_cli.models.hf import portable_spec
from theseus_cli.rundir import run_directory
from theseus_cli.training.session import check_vocabulary, resolve_device
from theseus_cli.tasks import get_task
from theseus_cli.training.loops import evaluate, recalibrate_batchnorm
from theseus_cli.config.transport import TransportRecipe, alpha_values
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.seeds import Seeds
from theseus_cli.target_meta import ArchSpec, TargetMeta, TransportRecord
from theseus_cli.transport.deltas import apply_deltas, calibrate, owners, task_vector_deltas


def calibration_split(n: int, calib: int, val: int, seeds: Seeds) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=seeds.generator("transport_split"))
    if calib + val > n:
        raise DataError(f"transport: {calib} calibration + {val} validation samples, but the training split has {n}")
    return perm[:calib], perm[calib: calib + val]


def _other(recipe: TransportRecipe, source: str, normalization):
    cfg = data_override(recipe.data, source)
    return load_dataset(cfg, recipe.seed, recipe.task, normalization=normalization if cfg.source not in text_sources() else None)


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """The CLI's flags of ``theseus transport`` besides the recipe: the three checkpoints and overrides."""

    base_a: str | Path
    tuned_a: str | Path
    base_b: str | Path
    calib: Optional[str] = None  # another data source for the calibration inputs
    val: Optional[str] = None  # another data source for choosing α
    alpha: Optional[float] = None
    alpha_grid: Optional[str] = None
    device: str = "auto"
    overwrite: bool = False
    progress: Progress = field(default_factory=NullProgress)  # a line per phase and per α tried


def run_transport(recipe: TransportRecipe, out: str | Path, options: TransportOptions) -> dict[str, Any]:
    """Move A′ − A onto B; write B′ and the report into ``out``; return the report."""
    with run_directory(out, options.overwrite) as out:
        return _transport(recipe, out, options)


def _inputs(recipe: TransportRecipe, options: TransportOptions, seeds: Seeds):
    """(data, normalisation, calibration inputs, validation inputs and labels)."""
    cfg = recipe.transport
    data = load_dataset(recipe.data, seeds.data, recipe.task)
    norm = {"mean": data.mean, "std": data.std} if data.mean else None
    calib_idx, val_idx = calibration_split(data.x_train.shape[0], cfg.calib_samples, 0 if options.val else cfg.val_samples, seeds)
    x_cal = (_other(recipe, options.calib, norm).x_train[:cfg.calib_samples] if options.calib else data.x_train[calib_idx])
    if options.val:
        vd = _other(recipe, options.val, norm)
        x_val, y_val = vd.x_train[:cfg.val_samples], (vd.y_train[:cfg.val_samples] if vd.y_train is not None else None)
    else:
        x_val, y_val = data.x_train[val_idx], (data.y_train[val_idx] if data.y_train is not None else None)
    return data, norm, x_cal, x_val, y_val


def _transport(recipe: TransportRecipe, out: Path, options: TransportOptions) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, seeds = recipe.transport, Seeds(recipe.seed)
    dev = resolve_device(options.device)
    log = options.progress.log
    log(f"transport: loading data {recipe.data.source} and models A, A′, B on {dev}")
    data, norm, x_cal, x_val, y_val = _inputs(recipe, options, seeds)
    load = lambda spec, path: load_guide(spec.arch, spec.kwargs, path, seeds.guide_init, recipe.task).to(dev).eval()  # noqa: E731
    a, a2, b = load(recipe.model_a, options.base_a), load(recipe.model_a, options.tuned_a), load(recipe.model_b, options.base_b)
    for m in (a, b):
        check_vocabulary(m, data)
    a_own, b_own = owners(a), owners(b)
    paths = [p for p in a_own if p in b_own and type(a_own[p]) is type(b_own[p])]
    bs = cfg.calib_batch_size
    batches = [x_cal[i: i + bs].to(dev) for i in range(0, len(x_cal), bs)]
    log(f"calibrate: {len(paths)} shared modules on {len(x_cal)} inputs ({len(batches)} batches)")
    stats = calibrate(a, b, paths, batches, run_model)
    deltas, layers, zero = task_vector_deltas(a, a2, b, stats, cfg.center, cfg.whiten)  # on the device, as the stats
    task, ebs = get_task(recipe.task), recipe.data.eval_batch_size

    def transported(value: float) -> torch.nn.Module:
        model = copy.deepcopy(b)
        apply_deltas(model, deltas, value)
        if cfg.recalibrate_bn:
            recalibrate_batchnorm(model, x_cal, max(1, len(x_cal) // bs), bs, seeds.generator("recalibrate"), dev)
        return model.eval()

    fixed = options.alpha if options.alpha is not None else cfg.alpha
    alphas = [fixed] if fixed is not None else alpha_values(options.alpha_grid or cfg.alpha_grid)
    search = []
    for v in alphas:
        search.append({"alpha": v, "validation": evaluate(transported(v), task, x_val, y_val, ebs, dev)})
        log(f"α {len(search)}/{len(alphas)}: α = {v:g}, validation {task.metric} {search[-1]['validation']:.4f}")
    better = max if task.higher_is_better else min
    chosen = better(search, key=lambda r: r["validation"])["alpha"]
    b2 = transported(chosen)
    test = {name: evaluate(m, task, data.x_test, data.y_test, ebs, dev)
            for name, m in (("A", a), ("A_tuned", a2), ("B", b), ("B_transported", b2))}
    arch, kwargs, tokenizer = portable_spec(recipe.model_b.arch, recipe.model_b.kwargs, data.tokenizer)
    meta = TargetMeta(guide=ArchSpec(arch=arch, kwargs=kwargs), task=recipe.task, input_shape=list(data.input_shape),
                      num_classes=data.num_classes, normalization=norm, tokenizer=tokenizer,
                      transport=TransportRecord(recipe=recipe.model_dump(mode="json"), alpha=chosen))
    save_target(out / TARGET_FILE, b2.cpu(), meta)
    calib, val, base_a, tuned_a, base_b = options.calib, options.val, options.base_a, options.tuned_a, options.base_b
    moved = sum(d.numel() for d in deltas.values())
    report = {
        "recipe": recipe.model_dump(mode="json"), "device": str(dev), "checkpoints": {"base_a": str(base_a),
        "tuned_a": str(tuned_a), "base_b": str(base_b)},
        "calibration": {"samples": int(len(x_cal)), "source": calib or recipe.data.source, "batches": len(batches)},
        "validation": {"samples": int(len(x_val)), "source": val or recipe.data.source},
        "alpha": {"chosen": chosen, "search": search, "metric": task.metric},
        "metric": {"name": task.metric, "higher_is_better": task.higher_is_better, **test},
        "layers": layers, "transported": sorted(deltas), "zero_delta": zero,
        "parameters_moved": moved, "parameters_in_b": sum(p.numel() for p in b.parameters()),
        "wall_time": time.perf_counter() - started, "files": {"target": TARGET_FILE, "report": REPORT_FILE},
    }
    write_json(out / REPORT_FILE, report)
    log(f"wrote {out}: B′ test {task.metric} {test['B_transported']:.4f} (B {test['B']:.4f}, α = {chosen:g})")
    return report
