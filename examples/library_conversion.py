"""Use theseus as a library: train a guide, convert it, reload the target, predict.

Runs in well under a minute on a laptop CPU on scikit-learn's 8×8 digits:
    python examples/library_conversion.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import theseus_cli
from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.data.dataset import load_dataset
from theseus_cli.pipelines.train_guide import train_guide
from theseus_cli.config.recipe import parse_recipe

RECIPE = {
    "guide": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 8}},
    "data": {"source": "digits", "batch_size": 64},
    "replace": [{"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 32}}],
    "align": {"epochs": 3, "lr": 2e-3},
    "bn_recalibration": {"batches": 10},
    "finetune": {"epochs": 6, "lr": 2e-3, "warmup_epochs": 1},
    "seed": 0,
}


def main(out: Path) -> dict:
    recipe = parse_recipe(RECIPE, "examples/library_conversion.py")
    guide = train_guide(recipe, out / "guide.safetensors", epochs=15, lr=5e-3, device="cpu")
    report = run_conversion(recipe, out / "run", ConvertOptions(checkpoint=out / "guide.safetensors", device="cpu", baseline=True, overwrite=True))

    target = theseus_cli.load_target(out / "run")  # rebuilt from target.safetensors alone
    data = load_dataset(recipe.data, recipe.seed)
    with torch.no_grad():
        predictions = target(data.x_test).argmax(1)
    reloaded_accuracy = (predictions == data.y_test).double().mean().item()

    acc = report["metric"]
    print(f"guide {guide['accuracy']:.3f} | NoT target {acc['target']:.3f} (reloaded: {reloaded_accuracy:.3f}) | "
          f"naive baseline {acc['baseline']:.3f} | params {report['params']['guide']:,} → {report['params']['target']:,}")
    return {"report": report, "reloaded_accuracy": reloaded_accuracy}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
