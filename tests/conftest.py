"""Shared helpers: tiny seeded recipes on real (small) data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

TINY = {
    "guide": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}},
    "data": {"source": "digits", "train_limit": 400, "test_limit": 200, "batch_size": 64, "eval_batch_size": 256},
    "replace": [{"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 16}}],
    "align": {"epochs": 1, "max_steps_per_epoch": 3, "lr": 1e-3},
    "bn_recalibration": {"batches": 2},
    "finetune": {"epochs": 1, "lr": 1e-3, "warmup_epochs": 0.5},
    "seed": 0,
}


def tiny_recipe_dict(**sections) -> dict:
    data = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(data: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
