"""``identity``: a shape-preserving module dropped; a stage that introduces only identities trains nothing."""

import pytest
import torch
import torch.nn as nn

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.errors import MatchError
from theseus_cli.replacements import IOShapes, get_replacement
from theseus_cli.surgery.plan import build_plan
from theseus_cli.training.session import open_session
from tests.conftest import tiny_recipe_dict


def test_identity_returns_its_input_in_the_old_structure():
    rep = get_replacement("identity")
    params = rep.params_model()
    x = torch.randn(2, 5, 8)
    assert rep.build(nn.Linear(8, 8), params, IOShapes((5, 8), (5, 8))).forward(x, attention_mask=None) is x
    out = rep.build(nn.Linear(8, 8), params, IOShapes((5, 8), (5, 8), output_arity=2))(hidden_states=x)
    assert out[0] is x and out[1] is None


def test_identity_refuses_a_module_that_changes_the_shape():
    rep = get_replacement("identity")
    assert "input's shape" in rep.check_fit(nn.Linear(8, 4), rep.params_model(), IOShapes((5, 8), (5, 4)))


def test_a_plan_dropping_a_convolution_that_changes_channels_names_the_module():
    recipe = parse_recipe(tiny_recipe_dict(replace=[{"match": "3", "with": "identity"}]))
    session = open_session(recipe, None, "cpu")
    with pytest.raises(MatchError, match="module '3'.*identity drops only"):
        build_plan(session.guide, recipe, session.data.x_train[:2])


def test_a_conversion_that_drops_a_batchnorm_trains_no_step_for_it(tmp_path):
    from theseus_cli.pipelines.convert import ConvertOptions, run_conversion

    recipe = parse_recipe(tiny_recipe_dict(replace=[{"match": "1", "with": "identity"},
                                                    {"match": "3", "with": "lowrank_conv", "params": {"rank": 2}}]))
    report = run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False))
    first, second = report["stages"]
    assert first["introduced"] == ["1"] and first["steps"] == 0 and first["stopped"] == "nothing to train"
    assert second["steps"] > 0
    assert report["params"]["target"] < report["params"]["guide"]
