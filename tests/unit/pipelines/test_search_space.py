"""The search space on a guide (groups, fitting choices, architectures), the methods' rewrites, the validation
split."""

import pytest
import torch

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.config.search import Alternative, SearchConfig, SearchRule
from theseus_cli.errors import MatchError, RecipeError
from theseus_cli.pipelines.search.methods import METHODS, MethodContext
from theseus_cli.pipelines.search.space import build_space, expand, split_groups
from theseus_cli.pipelines.search.validation import carve_validation
from theseus_cli.training.session import open_session
from tests.conftest import tiny_recipe_dict


@pytest.fixture(scope="module")
def session():
    return open_session(parse_recipe(tiny_recipe_dict(data={"label_limit": 100})), None, "cpu")


def _search(rules, methods=("not",)):
    return SearchConfig.model_validate({"base": "b.yaml", "space": {"rules": rules, "methods": list(methods)}})


def test_list_params_expand_into_one_choice_per_combination():
    alt = Alternative.model_validate({"with": "lowrank_conv", "params": {"rank_ratio": [0.25, 0.5], "init": "svd"}})
    assert [c.label for c in expand(alt)] == ["lowrank_conv(init=svd,rank_ratio=0.25)",
                                              "lowrank_conv(init=svd,rank_ratio=0.5)"]


def test_groups_split_by_path_depth_then_merge_consecutive_ones():
    paths = [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    rule = SearchRule.model_validate({"match": "Conv2d", "groups": {"depth": 1, "size": 2}, "with": ["keep"]})
    groups = split_groups(paths, rule)
    assert [g for g, _ in groups] == ["layer1..layer2", "layer3..layer4"]
    assert groups[1][1] == ["layer3.0.conv1", "layer3.1.conv1", "layer4.0.conv1", "layer4.1.conv1"]
    assert split_groups(paths, SearchRule.model_validate({"match": "Conv2d", "with": ["keep"]})) == [("all", paths)]


def test_architectures_are_the_product_of_the_groups_less_the_guide(session):
    search = _search([{"match": "re:[013]", "groups": {"depth": 1}, "with": ["keep", "separable_conv", "identity"]}])
    space = build_space(search, session.recipe, session.guide, session.data.x_train[:2], "s.yaml")
    conv, norm, _ = space.groups
    assert [c.label for c in conv.choices] == ["keep", "separable_conv"]  # a convolution changes the channels
    assert "input's shape" in conv.excluded["identity"]
    assert [c.label for c in norm.choices] == ["keep", "identity"]  # a BatchNorm is no convolution
    assert "separable_conv" in norm.excluded
    assert len(space.architectures) == 2 * 2 * 2 - 1
    assert len({a.digest for a in space.architectures}) == 7


def test_an_alternative_that_fits_no_module_is_an_error(session):
    search = _search([{"match": "Conv2d", "with": ["keep", "identity"]}])
    with pytest.raises(MatchError, match=r"space.rules\[0\].with\[1\]: identity fits no module"):
        build_space(search, session.recipe, session.guide, session.data.x_train[:2], "s.yaml")


def test_a_space_with_nothing_but_keep_is_empty(session):
    with pytest.raises(RecipeError, match="the space is empty"):
        build_space(_search([{"match": "Conv2d", "with": ["keep"]}]), session.recipe, session.guide,
                    session.data.x_train[:2], "s.yaml")


def test_bad_params_of_an_alternative_name_their_place(session):
    search = _search([{"match": "Conv2d", "with": [{"with": "lowrank_conv", "params": {"rank": 0}}]}])
    with pytest.raises(RecipeError, match=r"space.rules\[0\].with\[0\]"):
        build_space(search, session.recipe, session.guide, session.data.x_train[:2], "s.yaml")


def test_each_method_rewrites_the_recipe_it_is_named_for():
    base = parse_recipe(tiny_recipe_dict(finetune={"distill": {"weight": 0.3}})).resolved()
    ctx = MethodContext("cka", align_steps=12, finetune_steps_per_epoch=4)
    out = {}
    for name in ("not", "not-teacher", "progressive-distill", "distill"):
        data = parse_recipe(base).resolved()
        METHODS.lookup(name).rewrite(data, ctx)
        out[name] = parse_recipe(data)
    assert out["not"].finetune.distill is None and out["not"].similarity.kind == "cka"
    assert out["not-teacher"].finetune.distill.weight == 0.3
    assert out["progressive-distill"].schedule.objective == "distill"
    assert out["distill"].align.epochs == 0 and out["distill"].finetune.epochs == base["finetune"]["epochs"] + 3
    assert out["distill"].finetune.distill.weight == 0.3


def test_guide_agreement_holds_out_unlabelled_inputs_and_keeps_every_label(session):
    trial, info = carve_validation(session, 50, "auto", 0)
    data, before = trial.data, session.data
    assert info["rank_by"] == "guide-agreement" and info["from"] == "unlabelled training inputs"
    assert data.x_test.shape[0] == 50 and data.x_train.shape[0] == before.x_train.shape[0] - 50
    assert data.labelled.numel() == before.labelled.numel()  # no label spent on ranking
    assert torch.equal(data.x_train[data.labelled].sum((1, 2, 3)).sort().values,
                       before.x_train[before.labelled].sum((1, 2, 3)).sort().values)
    guide = session.guide.eval()
    with torch.no_grad():
        assert torch.equal(data.y_test, guide(data.x_test).argmax(-1))  # the labels are the guide's classes


def test_labels_rank_when_every_input_is_labelled_and_the_split_is_capped():
    full = open_session(parse_recipe(tiny_recipe_dict()), None, "cpu")
    trial, info = carve_validation(full, 10_000, "auto", 0)
    assert info["rank_by"] == "labels" and info["size"] == full.data.x_train.shape[0] // 5
    assert trial.data.labelled.numel() == trial.data.x_train.shape[0]


def test_two_rules_on_nested_modules_are_never_combined():
    resnet = open_session(parse_recipe(tiny_recipe_dict(guide={"arch": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
                                                        data={"channels": 3, "image_size": 32})), None, "cpu")
    search = _search([{"match": "re:layer1\\.\\d\\.conv1", "with": ["keep", "separable_conv"]},
                      {"match": "re:layer1\\.1", "with": ["keep", "identity"]}])
    space = build_space(search, resnet.recipe, resnet.guide, resnet.data.x_train[:2], "s.yaml")
    assert space.overlapping == 1 and len(space.architectures) == 2  # conv alone, block dropped alone
    assert {a.label for a in space.architectures} == {"all:separable_conv", "all:identity"}


def test_every_method_a_search_file_may_name_is_registered_and_no_other():
    from theseus_cli.config.search import METHODS as NAMES

    assert set(METHODS) == set(NAMES)
