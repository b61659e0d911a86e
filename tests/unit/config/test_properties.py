"""Property tests (hypothesis): no input makes the recipe loader or the matcher fail with anything but the
tool's own error types."""

import copy

import pytest
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theseus_cli.errors import MatchError, RecipeError
from theseus_cli.surgery.matching import resolve_matches
from theseus_cli.config.recipe import Recipe, load_recipe, parse_recipe
from tests.conftest import TINY

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20)
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                         max_leaves=20)
SECTION_KEYS = ["guide", "data", "replace", "target", "schedule", "similarity", "align", "bn_recalibration",
                "finetune", "baseline", "runtime", "seed", "task"]


def _parse_or_own_error(data) -> None:
    try:
        assert isinstance(parse_recipe(data), Recipe)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)


@SETTINGS
@given(json_like)
def test_any_data_is_a_recipe_or_a_recipe_error(data):
    _parse_or_own_error(data)


@SETTINGS
@given(st.dictionaries(st.sampled_from(SECTION_KEYS), json_like, max_size=6))
def test_any_sections_are_a_recipe_or_a_recipe_error(data):
    _parse_or_own_error(data)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


VALID_PATHS = [p for p in _paths(TINY) if p]


@SETTINGS
@given(st.sampled_from(VALID_PATHS), json_like)
def test_one_field_of_a_valid_recipe_set_to_anything(path, value):
    data = copy.deepcopy(TINY)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _parse_or_own_error(data)


@SETTINGS
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_file_text_is_a_recipe_or_a_recipe_error(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert str(exc).startswith(str(path)) or "recipe" in str(exc)


MODEL = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 2))
NAMES = ["Conv2d", "Linear", "BatchNorm2d", "ReLU", "Sequential", "0", "1", "2", "2.0", "2.1", "3"]
patterns = (st.sampled_from(NAMES) | st.text(max_size=8) | st.sampled_from(NAMES).map(lambda n: "re:" + n)
            | st.text(max_size=8).map(lambda t: "re:" + t) | st.sampled_from(["re:.*", "re:2\\..*", "re:(", "re:[0-9]"]))


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"match": st.lists(patterns, min_size=1, max_size=3) | patterns,
                                       "ignore": st.lists(patterns, max_size=2)}), min_size=1, max_size=3))
def test_any_rules_give_matches_or_the_tools_errors(rules):
    data = copy.deepcopy(TINY)
    data["replace"] = [{**r, "with": "lowrank_linear"} for r in rules]
    try:
        recipe = parse_recipe(data)
    except RecipeError:
        return
    try:
        matches = resolve_matches(MODEL, recipe.replace)
    except MatchError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    paths = [m.path for m in matches]
    assert len(paths) == len(set(paths)) and all(dict(MODEL.named_modules()).get(p) is not None for p in paths)
    assert not any(a != b and b.startswith(a + ".") for a in paths for b in paths)  # never nested


@pytest.mark.parametrize("text", ["{", "replace: [", "\t- x", "a: !!python/object/apply:os.system ['touch x']"])
def test_yaml_tags_and_syntax_errors_are_recipe_errors(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError):
        load_recipe(path)
    assert not (tmp_path / "x").exists()
