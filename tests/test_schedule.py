import copy

import pytest
import torch

from theseus_cli.hooks import forward_until
from theseus_cli.plan import apply_entries, build_plan
from theseus_cli.recipe import AlignConfig, parse_recipe
from theseus_cli.schedule import build_stages, group_paths
from theseus_cli.similarity import cka_loss
from theseus_cli.training import align_stage
from theseus_cli.zoo import resnet_small
from tests.conftest import tiny_recipe_dict

PATHS = ["conv1", "layers.0.0.conv1", "layers.0.0.conv2", "layers.1.0.conv1", "layers.1.0.conv2"]


def test_grouping_by_path_prefix():
    assert group_paths(PATHS, None) == [[p] for p in PATHS]
    assert group_paths(PATHS, 2) == [["conv1"], PATHS[1:3], PATHS[3:5]]
    assert group_paths(PATHS, 1) == [["conv1"], PATHS[1:]]


def test_stage_plans_of_every_schedule():
    prog = build_stages(PATHS, "progressive", "forward", None)
    assert [s.introduced for s in prog] == [[p] for p in PATHS]
    assert [s.trained for s in prog] == [PATHS[: i + 1] for i in range(5)] and all(s.trained == s.aligned for s in prog)
    rev = build_stages(PATHS, "progressive", "reverse", None)
    assert [s.introduced for s in rev] == [[p] for p in reversed(PATHS)]
    assert rev[1].trained == PATHS[3:]  # execution order inside a stage
    seq = build_stages(PATHS, "sequential", "forward", 2)
    assert [s.trained for s in seq] == [["conv1"], PATHS[1:3], PATHS[3:5]] and all(s.feed == "hybrid" for s in seq)
    ind = build_stages(PATHS, "independent", "forward", None)
    assert [s.trained for s in ind] == [[p] for p in PATHS] and all(s.feed == "guide" for s in ind)
    (joint,) = build_stages(PATHS, "joint", "reverse", 2)
    assert joint.introduced == joint.trained == joint.aligned == PATHS
    grouped = build_stages(PATHS, "progressive", "forward", 2)
    assert [s.introduced for s in grouped] == [["conv1"], PATHS[1:3], PATHS[3:5]] and grouped[2].trained == PATHS


@pytest.mark.parametrize("kind, order", [("progressive", "forward"), ("progressive", "reverse"), ("sequential", "forward"),
                                         ("independent", "forward"), ("joint", "forward")])
def test_each_schedule_trains_exactly_its_parameters(kind, order):
    torch.manual_seed(0)
    guide = resnet_small(widths=(4, 8), blocks=(1, 1)).eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    recipe = parse_recipe(tiny_recipe_dict(schedule={"kind": kind, "order": order}))
    x = torch.randn(32, 1, 8, 8)
    plan = build_plan(guide, recipe, x[:2])
    target = copy.deepcopy(guide)
    by_path = {e.path: e for e in plan.entries}
    for index, stage in enumerate(plan.stages):
        apply_entries(target, [by_path[p] for p in stage.introduced])
        before = {k: v.clone() for k, v in target.state_dict().items()}
        deepest = max(stage.aligned, key=plan.paths.index)
        align_stage(index, guide, target, stage, deepest, x, AlignConfig(epochs=1, lr=1e-2), cka_loss, 16,
                    torch.Generator().manual_seed(index), torch.device("cpu"))
        after = target.state_dict()
        changed = {k.rsplit(".", 2)[0] for k in after if not torch.equal(after[k], before[k])}
        assert changed == set(stage.trained), (kind, index)


def test_independent_stage_feeds_the_guides_own_input():
    torch.manual_seed(0)
    guide = resnet_small(widths=(4, 8), blocks=(1, 1)).eval()
    x = torch.randn(4, 1, 8, 8)
    inputs, outputs = forward_until(guide, x, ["layers.0.0.conv2"], "layers.0.0.conv2", with_inputs=True)
    torch.testing.assert_close(guide.layers[0][0].conv2(inputs["layers.0.0.conv2"]), outputs["layers.0.0.conv2"])
    assert inputs["layers.0.0.conv2"].shape == (4, 4, 8, 8)
