"""Activation checkpointing in fine-tuning: the same trained weights and BatchNorm statistics as without it, fewer
activations kept for the backward pass, and a network with no blocks refused naming the field."""

import copy

import pytest
import torch
from torch import nn

from theseus_cli.errors import RecipeError
from theseus_cli.models.zoo import resnet_small
from theseus_cli.tasks import get_task
from theseus_cli.training.checkpointing import activation_checkpointing, blocks
from theseus_cli.training.loops import TaskJob, train_task


def _model() -> nn.Module:
    torch.manual_seed(0)
    return resnet_small(num_classes=10, in_chans=1, widths=[4, 8], blocks=[2, 2])


def _train(model: nn.Module, checkpointed: bool) -> nn.Module:
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    job = TaskJob(6, 1e-2, 0.0, 1, 1.0, 0.0, 16, torch.Generator().manual_seed(3), torch.device("cpu"), "t")
    with activation_checkpointing(model, checkpointed) as n:
        assert n == (len(blocks(model)) if checkpointed else 0)
        train_task(model, get_task("classification"), x, y, job)
    return model


def test_checkpointed_fine_tuning_trains_the_same_weights_and_batchnorm_statistics():
    plain, checkpointed = _train(_model(), False), _train(_model(), True)
    assert len(blocks(checkpointed)) == 4  # layers.0.0 … layers.1.1
    for (name, a), (_, b) in zip(plain.state_dict().items(), checkpointed.state_dict().items()):
        if a.is_floating_point():  # float32 rounding of a recomputed forward, a few steps: far below any real change
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name  # BatchNorm's batch counter: counted once per step, not twice
    assert "forward" not in vars(blocks(checkpointed)[0][1])  # the wrapper is gone after fine-tuning


def _saved_bytes(model: nn.Module, checkpointed: bool) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with activation_checkpointing(model, checkpointed), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(8, 1, 16, 16)).sum()
    return total


def test_checkpointing_keeps_fewer_activations_for_the_backward_pass():
    model = _model()
    assert _saved_bytes(model, True) < 0.5 * _saved_bytes(copy.deepcopy(model), False)


def test_a_network_without_blocks_is_refused():
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(RecipeError, match="finetune.checkpointing"):
        with activation_checkpointing(flat, True):
            pass


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_a_conversion_fine_tunes_with_checkpointing_and_refuses_a_flat_guide_before_any_work(tmp_path):
    from theseus_cli.config.recipe import parse_recipe
    from theseus_cli.pipelines.convert import ConvertOptions, run_conversion
    from tests.conftest import tiny_recipe_dict

    flat = parse_recipe(tiny_recipe_dict(finetune={"checkpointing": True}))
    with pytest.raises(RecipeError, match="finetune.checkpointing"):
        run_conversion(flat, tmp_path / "flat", ConvertOptions(device="cpu", latency=False))
    assert not (tmp_path / "flat" / "report.json").exists()
    guide = {"arch": "theseus_cli.zoo:resnet_small", "kwargs": {"num_classes": 10, "in_chans": 1, "widths": [4, 8],
                                                                "blocks": [2, 1]}}
    deep = parse_recipe(tiny_recipe_dict(guide=guide, finetune={"checkpointing": True},
                                         replace=[{"match": "re:layers\\.0\\.0\\.conv1", "with": "separable_conv"}]))
    report = run_conversion(deep, tmp_path / "deep", ConvertOptions(device="cpu", latency=False))
    assert report["recipe"]["finetune"]["checkpointing"] and 0 <= report["metric"]["target"] <= 1
