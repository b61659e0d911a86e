"""LoRA fine-tuning (``finetune.peft``): adapters on the kept modules only, the replacements trained in full, the
kept weights outside the adapters untouched, the adapters merged before the target is written, and the plan-time
memory check counting what is trained."""

import pytest
import torch
from safetensors.torch import load_file

from theseus_cli.artifacts import load_target
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.errors import RecipeError
from theseus_cli.pipelines.checks import trained_params
from theseus_cli.pipelines.convert import ConvertOptions, run_conversion
from theseus_cli.surgery.plan import build_plan
from theseus_cli.training.lora import lora_targets
from theseus_cli.training.session import open_session
from tests.conftest import tiny_recipe_dict

PEFT = {"rank": 2, "alpha": 4, "targets": ["Linear", "Conv2d"]}


def _recipe(**finetune):
    return parse_recipe(tiny_recipe_dict(replace=[{"match": "3", "with": "separable_conv"}],
                                         finetune={"epochs": 2, "lr": 1e-2, **finetune}))


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_lora_trains_adapters_and_replacements_and_merges_them_away(tmp_path):
    recipe = _recipe(peft=PEFT)
    session = open_session(recipe, None, "cpu")
    guide = {k: v.detach().clone() for k, v in session.guide.state_dict().items()}
    report = run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False), session=session)
    saved = load_file(str(tmp_path / "run" / "target.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)  # merged: the plain model's keys
    assert set(saved) >= {"0.weight", "8.weight", "1.weight", "4.weight"}
    for kept in ("1.weight", "1.bias", "4.weight", "4.bias", "8.bias"):  # frozen, no adapter
        assert torch.equal(saved[kept], guide[kept]), kept
    for adapted in ("0.weight", "8.weight"):  # the merged update (alpha / rank) · B·A is not zero after training
        assert not torch.equal(saved[adapted], guide[adapted]), adapted
    peft = report["finetune"]["peft"]
    assert peft["modules"] == 2 and peft["frozen_params"] > 0
    plan = build_plan(session.guide, recipe, session.data.x_train[:2])
    assert trained_params(recipe, session.guide, plan)[0] == peft["trainable_params"]  # the check counts the same
    model = load_target(tmp_path / "run" / "target.safetensors")
    assert {k: v for k, v in model.state_dict().items() if k in saved}.keys() == saved.keys()
    with torch.no_grad():
        assert model(session.data.x_test[:4]).shape == (4, 10)


def test_full_fine_tuning_moves_the_kept_weights_and_counts_every_parameter(tmp_path):
    recipe = _recipe()
    session = open_session(recipe, None, "cpu")
    plan = build_plan(session.guide, recipe, session.data.x_train[:2])
    assert trained_params(recipe, session.guide, plan) == (plan.target_params, 0)


def test_targets_leave_out_replacements_and_tied_weights():
    from theseus_cli.config.phases import PeftConfig

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight  # a head tied to the embedding, as GPT-2's
    cfg = PeftConfig(targets=["Linear", "Embedding"])
    assert lora_targets(model, cfg, replaced=["1"]) == ["0", "2"]
    assert lora_targets(tied, cfg, replaced=[]) == []


def test_targets_that_match_nothing_and_transfer_recipes_are_refused(tmp_path):
    recipe = _recipe(peft={"targets": ["re:nothing\\.here"]})
    with pytest.raises(RecipeError, match="finetune.peft.targets"):
        run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False))
    assert not (tmp_path / "run" / "report.json").exists()
    with pytest.raises(Exception, match="finetune.peft: LoRA adapts"):
        parse_recipe(tiny_recipe_dict(start="fresh", finetune={"peft": {}}))


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_under_lora_the_hybrid_shares_the_guides_frozen_tensors_and_never_writes_into_them(tmp_path):
    from theseus_cli.pipelines.convert import Conversion
    from theseus_cli.progress import NullProgress
    from theseus_cli.training.runtime import resolve_runtime

    recipe = _recipe(peft=PEFT)
    session = open_session(recipe, None, "cpu")
    before = {k: v.detach().clone() for k, v in session.guide.state_dict().items()}
    conv = Conversion(session, resolve_runtime(recipe.runtime, session.device, session.data), tmp_path / "c",
                      ConvertOptions(device="cpu"), NullProgress(), 0.0)
    conv.plan()
    guide_params = {k: p for k, p in session.guide.named_parameters()}
    shared = [k for k, p in conv.target.named_parameters() if k in guide_params and p is guide_params[k]]
    assert set(shared) == set(guide_params)  # before any stage: every weight is the guide's own tensor
    guide_buffers = dict(session.guide.named_buffers())
    assert all(b is not guide_buffers[k] for k, b in conv.target.named_buffers())  # statistics are the hybrid's
    assert trained_params(recipe, session.guide, conv.plan_)[1] == 0  # nothing frozen is held twice
    run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False), session=session)
    after = session.guide.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the guide came out as it went in
    assert not any(p.requires_grad for p in session.guide.parameters())
