"""The search file: its schema (every problem at once, with its location), its base, its budget's rungs."""

import pytest
import yaml

from theseus_cli.config.search import Budget, is_search_file, load_search
from theseus_cli.errors import RecipeError
from tests.conftest import REPO, tiny_recipe_dict


def _write(tmp_path, search: dict, base: dict | None = None):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or tiny_recipe_dict()))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **search}))
    return path


SPACE = {"rules": [{"match": "Conv2d", "with": ["keep", "separable_conv"]}]}


def test_the_shipped_search_recipe_names_the_shipped_edge_recipe():
    search, base = load_search(REPO / "recipes" / "search_resnet18_edge.yaml")
    assert base.guide.arch == "torchvision:resnet18"
    assert [m.method for m in search.space.methods] == ["not", "not-teacher", "progressive-distill", "distill"]
    assert search.goals.max_latency_ratio == 0.5 and search.budget.fractions() == [0.125, 1.0]


def test_a_search_file_is_told_from_a_recipe(tmp_path):
    path = _write(tmp_path, {"space": SPACE})
    assert is_search_file(path) and not is_search_file(tmp_path / "base.yaml")
    assert not is_search_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("fraction,eta,rungs", [(0.25, 4, [0.25, 1.0]), (0.125, 2, [0.125, 0.25, 0.5, 1.0]),
                                                (1.0, 3, [1.0]), (0.3, 3, [0.3, 0.9, 1.0])])
def test_rungs_grow_by_the_reduction_factor_up_to_the_full_budget(fraction, eta, rungs):
    assert Budget(min_fraction=fraction, reduction_factor=eta).fractions() == pytest.approx(rungs)


def test_every_problem_of_a_search_file_is_named_with_its_location(tmp_path):
    path = _write(tmp_path, {"space": {"rules": [{"match": "Conv2d", "with": [{"with": "keep", "params": {"rank": 2}},
                                                                             "no_such_replacement"]}],
                                       "methods": [{"method": "distill", "similarity": ["cka"]}, "bogus"]},
                             "goals": {"max_latency_ms": -1}, "budgett": {}})
    with pytest.raises(RecipeError) as err:
        load_search(path)
    text = str(err.value)
    for part in ("space.rules[0].with[0]", "'keep' takes no params", "no_such_replacement", "space.methods[0]",
                 "aligns no activations", "space.methods[1]", "goals.max_latency_ms", "budgett"):
        assert part in text, (part, text)


def test_a_base_that_rebuilds_a_target_network_is_refused(tmp_path):
    base = tiny_recipe_dict(target={"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1},
                                    "blocks": {"target": "Conv2d", "guide": "Conv2d"}})
    del base["replace"]
    with pytest.raises(RecipeError, match="base must be a replace recipe"):
        load_search(_write(tmp_path, {"space": SPACE}, base))


def test_a_missing_base_names_its_path(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base": "nowhere.yaml", "space": SPACE}))
    with pytest.raises(RecipeError, match="nowhere.yaml: recipe file not found"):
        load_search(path)


def test_the_readme_search_file_validates(tmp_path):
    import re

    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(base: edge_resnet18_separable\.yaml.*?)```", readme, re.S).group(1)
    data = yaml.safe_load(block)
    data["base"] = str(REPO / "recipes" / data["base"])
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    search, base = load_search(path)
    assert len(search.space.rules) == 2 and search.goals.min_retention == 0.95 and base.guide.arch.startswith("torchvision")


def test_a_sampler_other_than_the_grid_needs_a_trial_count(tmp_path):
    with pytest.raises(RecipeError, match="sampler: tpe proposes candidates without end; set budget.trials"):
        load_search(_write(tmp_path, {"space": SPACE, "sampler": "tpe"}))
    search, _ = load_search(_write(tmp_path, {"space": SPACE, "sampler": "tpe", "budget": {"trials": 3}}))
    assert search.budget.trials == 3
