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
from pathlib import Path
from typing import Any

import torch

from theseus_cli.arch import load_guide
from theseus_cli.artifacts import REPORT_FILE, TARGET_FILE, save_target, write_json
from theseus_cli.batch import run_model
from theseus_cli.data import load_dataset
from theseus_cli.errors import DataError
from theseus_cli.evaluation import data_override
from theseus_cli.hf_models import portable_spec
from theseus_cli.rundir import run_directory
from theseus_cli.session import check_vocabulary, resolve_device
from theseus_cli.tasks import get_task
from theseus_cli.training import evaluate, recalibrate_batchnorm
from theseus_cli.transport import TransportRecipe, alpha_values, apply_deltas, calibrate, owners, task_vector_deltas


def _split(n: int, calib: int, val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 11))
    if calib + val > n:
        raise DataError(f"transport: {calib} calibration + {val} validation samples, but the training split has {n}")
    return perm[:calib], perm[calib: calib + val]


def _other(recipe: TransportRecipe, source: str, normalization):
    cfg = data_override(recipe.data, source)
    return load_dataset(cfg, recipe.seed, recipe.task, normalization=normalization if cfg.source not in ("bible-kjv", "text") else None)


def run_transport(recipe: TransportRecipe, base_a: str | Path, tuned_a: str | Path, base_b: str | Path, out: str | Path,
                  calib: str | None = None, val: str | None = None, alpha: float | None = None,
                  alpha_grid: str | None = None, device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    with run_directory(out, overwrite) as out:
        return _transport(recipe, base_a, tuned_a, base_b, out, calib, val, alpha, alpha_grid, device)


def _transport(recipe: TransportRecipe, base_a, tuned_a, base_b, out: Path, calib, val, alpha, alpha_grid,
               device: str) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, seed = recipe.transport, recipe.seed
    dev = resolve_device(device)
    data = load_dataset(recipe.data, seed, recipe.task)
    norm = {"mean": data.mean, "std": data.std} if data.mean else None
    calib_idx, val_idx = _split(data.x_train.shape[0], cfg.calib_samples, 0 if val else cfg.val_samples, seed)
    x_cal = (_other(recipe, calib, norm).x_train[:cfg.calib_samples] if calib else data.x_train[calib_idx])
    if val:
        vd = _other(recipe, val, norm)
        x_val, y_val = vd.x_train[:cfg.val_samples], (vd.y_train[:cfg.val_samples] if vd.y_train is not None else None)
    else:
        x_val, y_val = data.x_train[val_idx], (data.y_train[val_idx] if data.y_train is not None else None)

    a = load_guide(recipe.model_a.arch, recipe.model_a.kwargs, base_a, seed, recipe.task).to(dev).eval()
    a2 = load_guide(recipe.model_a.arch, recipe.model_a.kwargs, tuned_a, seed, recipe.task).to(dev).eval()
    b = load_guide(recipe.model_b.arch, recipe.model_b.kwargs, base_b, seed, recipe.task).to(dev).eval()
    for m in (a, b):
        check_vocabulary(m, data)
    a_own, b_own = owners(a), owners(b)
    paths = [p for p in a_own if p in b_own and type(a_own[p]) is type(b_own[p])]

    bs = cfg.calib_batch_size
    batches = [x_cal[i: i + bs].to(dev) for i in range(0, len(x_cal), bs)]
    stats = calibrate(a, b, paths, batches, run_model)
    deltas, layers, zero = task_vector_deltas(a, a2, b, stats, cfg.center, cfg.whiten)  # on the device, as the stats

    task = get_task(recipe.task)
    ebs = recipe.data.eval_batch_size

    def transported(value: float) -> torch.nn.Module:
        model = copy.deepcopy(b)
        apply_deltas(model, deltas, value)
        if cfg.recalibrate_bn:
            recalibrate_batchnorm(model, x_cal, max(1, len(x_cal) // bs), bs, torch.Generator().manual_seed(seed + 2), dev)
        return model.eval()

    fixed = alpha if alpha is not None else cfg.alpha
    alphas = [fixed] if fixed is not None else alpha_values(alpha_grid or cfg.alpha_grid)
    search = [{"alpha": v, "validation": evaluate(transported(v), task, x_val, y_val, ebs, dev)} for v in alphas]
    better = max if task.higher_is_better else min
    chosen = better(search, key=lambda r: r["validation"])["alpha"]
    b2 = transported(chosen)
    test = {name: evaluate(m, task, data.x_test, data.y_test, ebs, dev)
            for name, m in (("A", a), ("A_tuned", a2), ("B", b), ("B_transported", b2))}

    arch, kwargs, tokenizer = portable_spec(recipe.model_b.arch, recipe.model_b.kwargs, data.tokenizer)
    meta = {"guide": {"arch": arch, "kwargs": kwargs}, "task": recipe.task, "target": None,
            "entries": [], "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "normalization": norm, "tokenizer": tokenizer, "recipe": None,
            "transport": {"recipe": recipe.model_dump(mode="json"), "alpha": chosen}}
    save_target(out / TARGET_FILE, b2.cpu(), meta)
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
    return report
