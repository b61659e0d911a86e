import copy
import pytest

import torch
import torch.nn as nn

from theseus_cli.models.hooks import forward_until
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.config.recipe import AlignConfig, parse_recipe
from theseus_cli.surgery.schedule import Stage
from theseus_cli.similarity import cka_loss
from theseus_cli.training import AlignJob, align_stage, layer_similarity, lr_factor, recalibrate_batchnorm
from theseus_cli.models.zoo import resnet_small
from tests.conftest import tiny_recipe_dict
from tests.numeric import f32_tolerance


def setup():
    torch.manual_seed(0)
    guide = resnet_small(widths=(4, 8), blocks=(1, 1)).eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    recipe = parse_recipe(tiny_recipe_dict())
    x = torch.randn(64, 1, 8, 8)
    plan = build_plan(guide, recipe, x[:2])
    return guide, plan, x


def test_stage_trains_only_replacements_and_keeps_batchnorm_statistics():
    guide, plan, x = setup()
    target = copy.deepcopy(guide)
    apply_entries(target, plan.entries[:2])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    guide_before = {k: v.clone() for k, v in guide.state_dict().items()}
    stage = Stage(plan.paths[1:2], plan.paths[:2], plan.paths[:2])
    result = align_stage(1, guide, target, stage, x, AlignJob(AlignConfig(epochs=2, lr=1e-2),
                         cka_loss, 16, torch.Generator().manual_seed(0), torch.device("cpu")))
    after = target.state_dict()
    replaced = tuple(p + "." for p in plan.paths[:2])
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(replaced) for k in changed)
    assert {k for k in after if k.startswith(replaced)} == changed  # every replacement weight moved
    assert all(torch.equal(guide.state_dict()[k], v) for k, v in guide_before.items())
    assert result.steps == 8 and len(result.losses) == 8
    assert result.losses[-1] < result.losses[0]
    assert set(result.final_layer_losses) == set(plan.paths[:2])


def test_forward_stops_after_the_deepest_aligned_module():
    guide, plan, x = setup()
    calls = []
    guide.fc.register_forward_hook(lambda *a: calls.append("fc"))
    acts = forward_until(guide, x[:4], plan.paths[:2], plan.paths[1])
    assert set(acts) == set(plan.paths[:2]) and calls == []


def test_alignment_raises_similarity():
    guide, plan, x = setup()
    target = copy.deepcopy(guide)
    apply_entries(target, plan.entries[:1])
    start = layer_similarity(guide, target, plan.paths[:1], x, torch.device("cpu"))[plan.paths[0]]["cka"]
    align_stage(0, guide, target, Stage(plan.paths[:1], plan.paths[:1], plan.paths[:1]), x, AlignJob(AlignConfig(epochs=20, lr=1e-2), cka_loss, 32, torch.Generator().manual_seed(0), torch.device("cpu")))
    end = layer_similarity(guide, target, plan.paths[:1], x, torch.device("cpu"))[plan.paths[0]]["cka"]
    assert end > start + 0.2 and end > 0.8


def test_batchnorm_recalibration_estimates_fresh_statistics():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Identity(), bn)
    x = 5 + 2 * torch.randn(256, 3, 4, 4)
    n = recalibrate_batchnorm(model, x, batches=4, batch_size=64, generator=torch.Generator().manual_seed(0),
                              device=torch.device("cpu"))
    assert n == 1
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-4, rtol=0)
    assert bn.momentum == 0.1 and not model.training


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == 0.1 and lr_factor(9, 100, 10) == 1.0
    assert abs(lr_factor(55, 100, 10) - 0.5) < 1e-9 and lr_factor(100, 100, 10) == 0.0


def test_micro_batched_alignment_step_gives_the_full_batch_gradient():
    import copy

    from theseus_cli.models.build import build_model
    from theseus_cli.surgery.plan import apply_entries, build_plan
    from theseus_cli.config.recipe import parse_recipe
    from theseus_cli.training.runtime import Runtime
    from theseus_cli.similarity import make_loss
    from theseus_cli.training import AlignJob, stage_losses as _stage_losses, micro_batched_step
    from tests.conftest import tiny_recipe_dict

    recipe = parse_recipe(tiny_recipe_dict())
    guide = build_model(recipe.guide.arch, recipe.guide.kwargs, 0).eval()
    x = torch.randn(24, 1, 8, 8)
    plan = build_plan(guide, recipe, x[:2])
    target = copy.deepcopy(guide)
    apply_entries(target, plan.entries)
    stage = plan.stages[-1]
    for kind in ("cka", "ucka", "dmnn"):
        loss_fn = make_loss(kind, k=5)
        target.zero_grad(set_to_none=True)
        full = _stage_losses(guide, target, stage, x, loss_fn, "flatten")
        full.mean().backward()
        expected = {n: p.grad.clone() for n, p in target.named_parameters() if p.grad is not None}
        target.zero_grad(set_to_none=True)
        sliced = micro_batched_step(guide, target, stage, x, AlignJob(AlignConfig(), loss_fn, len(x), None, torch.device("cpu")), 7)
        # both float32, summed in other orders: CKA-type losses lie in [0, 1] and come from sums over the 24 rows
        assert torch.allclose(sliced, full.detach(), atol=f32_tolerance(1.0, terms=len(x)))
        got = {n: p.grad for n, p in target.named_parameters() if p.grad is not None}
        assert got.keys() == expected.keys() and expected
        assert all(torch.allclose(got[n], expected[n], atol=1e-6, rtol=1e-4) for n in expected), kind


def test_guide_cache_gives_the_same_alignment_with_fewer_guide_forwards(tmp_path):
    from theseus_cli import ConvertOptions, run_conversion
    from theseus_cli.config.recipe import parse_recipe
    from tests.conftest import tiny_recipe_dict

    plain = run_conversion(parse_recipe(tiny_recipe_dict(align={"epochs": 3, "max_steps_per_epoch": 100})), tmp_path / "a", ConvertOptions(device="cpu"))
    cached = run_conversion(parse_recipe(tiny_recipe_dict(align={"epochs": 3, "max_steps_per_epoch": 100,
                                                                 "cache_guide": True})), tmp_path / "b", ConvertOptions(device="cpu"))
    for a, b in zip(plain["stages"], cached["stages"]):
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)
    assert cached["metric"]["target"] == pytest.approx(plain["metric"]["target"], abs=0.01)
    steps = sum(s["steps"] for s in cached["stages"])
    info = cached["guide_cache"]
    # 2 stages × 3 epochs × 6 batches of 64: without the cache the guide runs on 36 × 64 rows; with it, each of
    # the 400 samples once per stage (stage 2 aligns a new point too)
    assert steps == 36 and info["points"] == ["0", "3"] and not info["refused"]
    assert info["guide_rows"] <= 2 * 400


def test_guide_cache_refuses_what_does_not_fit():
    from theseus_cli.training.guide_cache import GuideCache

    cache = GuideCache(10, torch.device("cpu"), budget=10 * 4 * 4)  # room for one (10, 4) float32 point
    guide = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 8))
    x = torch.randn(5, 3)
    out = cache.fetch(guide, x, torch.arange(5), ["0", "1"])
    assert set(cache.store) == {"0"} and "over the cache budget" in cache.refused["1"]
    again = cache.fetch(guide, x, torch.arange(5), ["0", "1"])
    assert torch.equal(out["0"], again["0"]) and torch.allclose(out["1"], again["1"])
