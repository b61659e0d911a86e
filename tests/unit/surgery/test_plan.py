import pytest
import torch
import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.surgery.plan import apply_entries, build_plan, count_params
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.models.zoo import resnet_small
from tests.conftest import tiny_recipe_dict


def recipe_for(**kw):
    return parse_recipe(tiny_recipe_dict(**kw))


def test_plan_is_in_execution_order_with_shapes_and_counts():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    plan = build_plan(model, recipe_for(), torch.randn(2, 1, 8, 8))
    assert plan.paths == ["conv1", "layers.0.0.conv1", "layers.0.0.conv2", "layers.1.0.conv1", "layers.1.0.conv2",
                          "layers.1.0.downsample.0"]  # the shortcut runs after the main path
    first = plan.entries[0]
    assert (first.input_shape, first.output_shape) == ((1, 8, 8), (4, 8, 8))
    assert first.target_params == 64 * 16 + 16 * 256 + 256
    assert plan.guide_params == count_params(model)
    assert plan.target_params == plan.guide_params - sum(e.guide_params for e in plan.entries) + sum(e.target_params for e in plan.entries)
    assert [st.introduced for st in plan.stages] == [[p] for p in plan.paths]
    assert plan.stages[-1].trained == plan.stages[-1].aligned == plan.paths
    kept = {r.path for r in plan.rows if r.becomes is None}
    assert {"bn1", "fc", "pool"} <= kept


def test_applied_plan_matches_counted_params_and_runs():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    plan = build_plan(model, recipe_for(), torch.randn(2, 1, 8, 8))
    apply_entries(model, plan.entries)
    assert count_params(model) == plan.target_params
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())


def test_replacement_that_does_not_fit_the_module_type():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    recipe = recipe_for(replace=[{"match": "fc", "with": "separable_conv"}])
    with pytest.raises(MatchError, match=r"module 'fc' \(replace\[0\]\): separable_conv replaces Conv1d, Conv2d, Conv3d, not Linear"):
        build_plan(model, recipe, torch.randn(2, 1, 8, 8))


def test_a_module_the_params_do_not_fit_is_refused_at_plan_time():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    recipe = recipe_for(replace=[{"match": "conv1", "with": "lowrank_conv", "params": {"rank": 50}}])
    with pytest.raises(MatchError, match=r"module 'conv1' \(replace\[0\]\): rank 50 exceeds the full rank 4"):
        build_plan(model, recipe, torch.randn(2, 1, 8, 8))


class PadsAtRunTime(nn.Conv2d):
    """Like timm's Conv2dSame: stored padding 0, the padding applied in forward."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_a_replacement_whose_shape_departs_from_the_module_is_refused():
    model = nn.Sequential(PadsAtRunTime(1, 2, 3), nn.Flatten(), nn.Linear(2 * 8 * 8, 10))
    recipe = recipe_for(replace=[{"match": "0", "with": "separable_conv"}])
    with pytest.raises(MatchError, match=r"module '0' .*gives shape \(2, 6, 6\) where the module gives \(2, 8, 8\)"):
        build_plan(model, recipe, torch.randn(2, 1, 8, 8))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.unused = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return self.conv(self.conv(x)).flatten(1)


def test_shared_and_unused_modules_are_rejected():
    recipe = recipe_for(replace=[{"match": "Conv2d", "with": "lowrank_linear"}])
    with pytest.raises(MatchError) as info:
        build_plan(Shared(), recipe, torch.randn(2, 1, 4, 4))
    assert "module 'conv' (replace[0]): runs 2 times per forward pass" in str(info.value)
    assert "module 'unused' (replace[0]): never runs in the forward pass" in str(info.value)


def test_dry_forward_failure_names_the_input_shape():
    model = resnet_small(in_chans=3)
    with pytest.raises(MatchError, match=r"dry forward of the guide on an input of shape \(2, 1, 8, 8\) failed"):
        build_plan(model, recipe_for(), torch.randn(2, 1, 8, 8))


def test_torchvision_resnet18_every_conv_planned_in_execution_order():
    from theseus_cli.pipelines.inspect import inspect_guide

    recipe = recipe_for(guide={"arch": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
                        data={"channels": 3, "image_size": 32, "train_limit": 64, "test_limit": 16},
                        replace=[{"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 64}}])
    plan = inspect_guide(recipe)
    paths = [e["path"] for e in plan["entries"]]
    assert len(paths) == 20 and paths[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert paths.index("layer2.0.downsample.0") == paths.index("layer2.0.conv2") + 1
    assert plan["entries"][0]["input_shape"] == [3, 32, 32] and plan["entries"][0]["output_shape"] == [64, 16, 16]
    assert plan["guide"]["trained"] is False and plan["data"]["input_shape"] == [3, 32, 32]
