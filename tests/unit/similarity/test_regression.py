"""similarity.kind: mse — basis-sensitive feature regression for replacements inside a kept architecture."""

import pytest
import torch

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.errors import RecipeError
from theseus_cli.similarity import make_loss, relative_mse
from tests.conftest import tiny_recipe_dict


def test_zero_for_a_match_one_for_zeros_and_not_rotation_invariant():
    g = torch.randn(16, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    loss = make_loss("mse")
    assert float(loss(g.clone(), g)) == 0.0
    assert float(loss(torch.zeros_like(g), g)) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(36, 36, generator=torch.Generator().manual_seed(1)))
    rotated = (g.flatten(1) @ q).reshape(g.shape)
    assert float(loss(rotated, g)) > 0.5  # CKA would call these identical; the kept layers downstream would not
    assert float(loss(2 * g, g)) == pytest.approx(1.0)  # scale matters too
    assert float(loss(g * 1e3, g * 1e3 + 1e-3)) == pytest.approx(float(loss(g, g + 1e-6)), rel=1e-3)  # scale-free value


def test_gradient_pulls_toward_the_guide_and_shapes_must_match():
    g = torch.randn(8, 5)
    t = torch.zeros(8, 5, requires_grad=True)
    relative_mse(t, g).backward()
    assert torch.allclose(t.grad, -2 * g / g.pow(2).sum())
    with pytest.raises(ValueError, match="equal shapes"):
        relative_mse(torch.zeros(8, 4), g)


def test_refused_for_architecture_transfers():
    data = tiny_recipe_dict(similarity={"kind": "mse"})
    assert parse_recipe(data).similarity.kind == "mse"
    data.pop("replace")
    data["target"] = {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2},
                      "blocks": {"guide": "re:\\d", "target": "re:\\d"}}
    with pytest.raises(RecipeError, match="similarity.kind: mse compares activations element by element"):
        parse_recipe(data)


def test_alignment_with_mse_keeps_an_exact_start_in_the_guides_basis(tmp_path):
    """End to end through alignment (plot, report): a full-rank SVD start reproduces each convolution exactly, and
    feature regression, at its minimum there, keeps the hybrid near the guide's accuracy through 3 epochs at lr 1e-2
    (a sign or scale error in the loss would move it far; a few test examples may flip with the thread count). What mse is worth against CKA is in bench/edge.py."""
    from tests.conftest import cli_conversion

    recipe = tiny_recipe_dict(replace=[{"match": "Conv2d", "with": "lowrank_conv", "params": {"rank_ratio": 1.0, "init": "svd"}}],
                              similarity={"kind": "mse"}, align={"epochs": 3, "lr": 1e-2})
    report = cli_conversion(tmp_path, recipe, 10, guide_lr=0.05)[3]
    m = report["metric"]
    assert m["guide"] > 0.3 and abs(m["target_after_alignment"] - m["guide"]) <= 0.04
