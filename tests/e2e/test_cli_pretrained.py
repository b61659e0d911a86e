"""Pretrained guides as users bring them: a 1000-class guide for a 10-class task, and real weights from another
codebase (EfficientNet-Lite0's ImageNet release) loaded into timm with a key map."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from theseus_cli.artifacts import load_target
from theseus_cli.cli.app import app
from tests.conftest import REPO, tiny_recipe_dict

runner = CliRunner()


def _thousand_class_guide(tmp_path) -> tuple[dict, str]:
    """A guide whose body learnt digits but whose head has 1,000 outputs (as an ImageNet model's has): trained
    with 10 classes, then its head padded with 990 random rows. Returns (recipe dict, checkpoint path)."""
    ten = tiny_recipe_dict()
    (tmp_path / "ten.yaml").write_text(yaml.safe_dump(ten))
    res = runner.invoke(app, ["train-guide", "-r", str(tmp_path / "ten.yaml"), "-o", str(tmp_path / "g10.safetensors"),
                              "--epochs", "15", "--json"])
    assert res.exit_code == 0, res.output
    state = load_file(str(tmp_path / "g10.safetensors"))
    gen = torch.Generator().manual_seed(1)
    state["8.weight"] = torch.cat([state["8.weight"], 0.3 * torch.randn(990, state["8.weight"].shape[1], generator=gen)])
    state["8.bias"] = torch.cat([state["8.bias"], torch.zeros(990)])
    save_file(state, str(tmp_path / "g1000.safetensors"))
    recipe = tiny_recipe_dict(guide={**ten["guide"], "kwargs": {**ten["guide"]["kwargs"], "num_classes": 1000}},
                              data={"label_limit": 200})
    return recipe, str(tmp_path / "g1000.safetensors")


def test_a_1000_class_guide_gets_a_new_head_for_a_10_class_task(tmp_path):
    recipe, ckpt = _thousand_class_guide(tmp_path)
    (tmp_path / "keep.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["inspect", ckpt, "-r", str(tmp_path / "keep.yaml")])
    assert res.exit_code == 6 and "10 classes, but the guide outputs 1000 logits" in res.output and "guide.head: reset" in res.output

    recipe["guide"]["head"] = "reset"
    (tmp_path / "reset.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["inspect", ckpt, "-r", str(tmp_path / "reset.yaml")])
    assert res.exit_code == 0 and "head reset: 8 (1000 → 10 classes; 2 checkpoint tensors dropped" in res.output
    res = runner.invoke(app, ["convert", ckpt, "-r", str(tmp_path / "reset.yaml"), "-o", str(tmp_path / "run"),
                              "--device", "cpu", "--no-latency", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    head = report["guide"]["checkpoint_fit"]["head"]
    assert (head["path"], head["classes_before"], head["classes"], head["probe"]["examples"]) == ("8", 1000, 10, 200)
    assert report["metric"]["guide"] > 0.5  # the probe on a trained body: a guide, not chance

    target = load_target(tmp_path / "run")
    assert target(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    res = runner.invoke(app, ["eval", str(tmp_path / "run"), "--device", "cpu", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["metric"]["value"] == pytest.approx(report["metric"]["target"])

    recipe["guide"]["head_probe_steps"] = 0  # the same guide, its new head left random: what the probe is for
    (tmp_path / "random_head.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["eval", ckpt, "-r", str(tmp_path / "random_head.yaml"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metric"]["value"] < report["metric"]["guide"] - 0.2


def test_the_lite0_recipe_converts_the_real_imagenet_weights(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / "efficientnet_lite0_pretrained.yaml").read_text())
    recipe["guide"]["head_probe_steps"] = 20
    recipe["data"].update(image_size=32, train_limit=48, label_limit=32, test_limit=16, batch_size=16, eval_batch_size=16)
    recipe.update(align={"epochs": 1, "max_steps_per_epoch": 1}, finetune={"epochs": 1}, bn_recalibration={"batches": 1})
    (tmp_path / "lite0.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["convert", "-r", str(tmp_path / "lite0.yaml"), "-o", str(tmp_path / "run"), "--device", "cpu",
                              "--no-latency", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    fit = report["guide"]["checkpoint_fit"]
    assert sum(r["keys"] for r in fit["renamed"]) >= 296 and all(r["keys"] > 0 for r in fit["renamed"])
    assert fit["head"]["classes_before"] == 1000 and fit["head"]["classes"] == 10
    assert len(report["plan"]["entries"]) == 15 and report["params"]["target"] < report["params"]["guide"]


def test_key_map_on_the_command_line_renames_a_foreign_checkpoint(tmp_path):
    from theseus_cli.zoo import cnn_small

    state = {f"net._{k}": v for k, v in cnn_small(width=4).state_dict().items()}
    save_file(state, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict()))
    args = ["inspect", str(tmp_path / "foreign.safetensors"), "-r", str(tmp_path / "r.yaml")]
    res = runner.invoke(app, args)
    assert res.exit_code == 4 and "keys differ like 'net.' ↔" in res.output and "--key-map" in res.output
    res = runner.invoke(app, [*args, "--key-map", r"re:^net\._=>"])
    assert res.exit_code == 0, res.output
    assert rf"key_map: re:^net\._ →  renamed {len(state)} keys" in res.output
