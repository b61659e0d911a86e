"""``theseus train-guide``: train the recipe's guide architecture on the recipe's data.

Users normally bring a trained guide. This verb exists so that the demo, the
benchmarks and a user without a checkpoint can train one here, on exactly the
data (and labelled subset) the conversion will use, and save it as a plain
safetensors state dict that ``convert`` reads like any other checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from theseus_cli.models.build import build_model
from theseus_cli.artifacts import atomic_write
from theseus_cli.data.dataset import batches_per_epoch, load_dataset
from theseus_cli.errors import RecipeError
from theseus_cli.seeds import Seeds
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.config.recipe import Recipe
from theseus_cli.training.runtime import resolve_runtime, using
from theseus_cli.training.session import check_classes, check_vocabulary, resolve_device
from theseus_cli.tasks import get_task
from theseus_cli.training import TaskJob, evaluate, train_task

if TYPE_CHECKING:
    from theseus_cli.config.search import Validation


def train_guide(recipe: Recipe, out: str | Path, epochs: int = 5, lr: float = 2e-3, weight_decay: float = 0.05,
                device: str = "auto", progress: Progress = NullProgress(), hold_out: "Validation | None" = None
                ) -> dict[str, Any]:
    """Train ``recipe.guide.arch`` from scratch on the labelled training data (the task's loss); save its state dict.

    ``hold_out`` (a search file's ``validation``; the CLI passes it when ``--recipe`` is a search file): leave out
    of training the inputs that search holds out to rank its trials, so that a guide which memorised its labels
    does not make the ranking reward imitating it (a guide scores near 1.0 on labels it was trained on, and every
    target that keeps its weights scores high there too, whatever it does on new inputs)."""
    from safetensors.torch import save_model

    if recipe.task == "sentence-embedding":
        raise RecipeError("train-guide: task sentence-embedding has no labels of its own (its targets are a trained "
                          "guide's embeddings); bring a pretrained encoder as the guide")
    started = time.perf_counter()
    dev = resolve_device(device)
    task = get_task(recipe.task)
    data = load_dataset(recipe.data, recipe.seed, recipe.task, recipe.guide.arch)
    held = _hold_out(data, recipe, hold_out)
    model = build_model(recipe.guide.arch, recipe.guide.kwargs, recipe.seed, recipe.task)
    check_vocabulary(model, data)
    check_classes(model, data, "the guide")
    rt = resolve_runtime(recipe.runtime, dev, data)
    if rt.data_on_device:
        data.to(dev)
    model = rt.prepare(model.to(dev))
    with using(rt):
        per_epoch = batches_per_epoch(data.labelled.numel(), recipe.data.batch_size)
        if held is not None:
            progress.log(f"train guide: {held['size']} {held['from']} held out (the search's validation split)")
        progress.log(f"train guide {recipe.guide.arch}: {epochs} epochs, {epochs * per_epoch:,} steps on {dev}")
        job = TaskJob(epochs * per_epoch, lr, weight_decay, per_epoch // 2, 1.0, 0.0, recipe.data.batch_size,
                      Seeds(recipe.seed).generator("train_guide"), dev, "train guide", progress)
        result, score = _train(model, task, data, recipe, job)
    out = Path(out)
    model = model.cpu().to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    atomic_write(out, lambda tmp: save_model(model, str(tmp), metadata={"arch": recipe.guide.arch}))
    return {"checkpoint": str(out), "arch": recipe.guide.arch, "task": recipe.task, "metric": task.metric,
            task.metric: score, "epochs": epochs, "steps": result.steps, "epoch_losses": result.epoch_losses,
            "device": str(dev), "runtime": rt.summary(), "data": data.summary(), "held_out": held,
            "seconds": time.perf_counter() - started}


def _hold_out(data, recipe: Recipe, validation) -> dict[str, Any] | None:
    """Drop the search's held-out inputs from ``data.labelled`` (in place); what was held out, or None."""
    if validation is None:
        return None
    from theseus_cli.pipelines.search.validation import held_out

    found = held_out(data, recipe.task, validation.size, validation.rank_by, recipe.seed)
    keep = ~torch.isin(data.labelled.cpu(), found.indices)
    data.labelled = data.labelled[keep.to(data.labelled.device)]
    if data.labelled.numel() == 0:
        raise RecipeError("train-guide: the search's validation split holds every labelled input; nothing is left "
                          "to train the guide on")
    return {"size": int(found.indices.numel()), "from": found.origin, "rank_by": found.mode,
            "labelled_left": int(data.labelled.numel())}


def _train(model, task, data, recipe: Recipe, job: TaskJob):
    x = data.x_train[data.labelled]
    y = data.y_train[data.labelled] if data.y_train is not None else None
    result = train_task(model, task, x, y, job)
    score = evaluate(model, task, data.x_test, data.y_test, recipe.data.eval_batch_size, job.device)
    return result, score
