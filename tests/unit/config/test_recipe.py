from pathlib import Path

import pytest

from theseus_cli.errors import RecipeError
from theseus_cli.config.recipe import load_recipe, parse_recipe
from tests.conftest import REPO, tiny_recipe_dict

ROOT = REPO
RECIPES = sorted(ROOT.glob("recipes/*.yaml")) + sorted(ROOT.glob("bench/recipes/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    from theseus_cli.config.search import is_search_file, load_search

    if is_search_file(path):  # a search file: its own schema, and its base recipe validated as every recipe is
        search, recipe = load_search(path)
        assert search.space.rules and search.space.methods
    else:
        recipe = load_recipe(path)
    assert (recipe.replace or recipe.target) and recipe.guide.arch


def test_shipped_recipes_exist():
    assert {"conv_to_linear.yaml", "demo.yaml"} <= {p.name for p in RECIPES}


def test_every_shipped_recipe_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in sorted(ROOT.glob("recipes/*.yaml")) if f"`recipes/{p.name}`" not in readme]
    assert not missing, f"recipes not in the README's table: {missing}"


def test_defaults_are_filled_and_hash_is_stable():
    a = parse_recipe(tiny_recipe_dict())
    b = parse_recipe(tiny_recipe_dict())
    assert a.resolved()["schedule"] == {"kind": "progressive", "order": "forward", "group_depth": None,
                                        "objective": "similarity", "temperature": 4.0, "max_store_gb": None}
    assert a.resolved()["replace"][0]["params"] == {"rank": 16, "rank_ratio": None, "init": "random",
                                                    "calibration": 512, "bias": True}
    assert a.digest() == b.digest()
    assert parse_recipe(tiny_recipe_dict(seed=1)).digest() != a.digest()


def test_malformed_yaml_names_file_and_line(write_recipe):
    path = write_recipe("guide:\n  arch: [unclosed\nreplace: 3\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: malformed YAML at line \d+"):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe("nope.yaml")


def test_top_level_must_be_mapping(write_recipe):
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write_recipe("- a\n- b\n"))


def test_all_problems_reported_at_once_with_locations():
    data = tiny_recipe_dict(align={"lr": -1, "epocs": 3}, finetune={"epochs": "many"})
    data["replace"].append({"match": "re:conv(", "with": "lowrank_linear"})
    data["replace"].append({"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 0, "rnak": 3}})
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, "r.yaml")
    msg = str(info.value)
    assert msg.startswith("r.yaml: 5 problems:")
    for fragment in ("align.lr:", "align.epocs: unknown key", "finetune.epochs:", "replace[1].match: pattern 're:conv(' does not compile",
                     "replace[2]: params.rank:", "params.rnak: unknown key"):
        assert fragment in msg
    assert "\n" not in msg


def test_unknown_replacement_lists_valid_choices():
    data = tiny_recipe_dict(replace=[{"match": "Conv2d", "with": "lowrank"}])
    with pytest.raises(RecipeError, match=r"unknown replacement 'lowrank' \(valid: elman_rnn, identity, linear_attention, lowrank_conv, lowrank_linear, separable_conv, token_mlp\)"):
        parse_recipe(data)


def test_unknown_schedule_and_similarity_list_choices():
    data = tiny_recipe_dict(schedule={"kind": "random"}, similarity={"kind": "l2"})
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert "schedule.kind: Input should be 'progressive'" in str(info.value)
    assert "similarity.kind: Input should be 'cka', 'ucka', 'dmnn' or 'mse'" in str(info.value)


def test_batch_too_small_for_the_similarity():
    with pytest.raises(RecipeError, match="ucka needs data.batch_size ≥ 4, got 3"):
        parse_recipe(tiny_recipe_dict(similarity={"kind": "ucka"}, data={"batch_size": 3}))
    with pytest.raises(RecipeError, match="similarity.k: dmnn with k=10 needs data.batch_size > k, got 8"):
        parse_recipe(tiny_recipe_dict(similarity={"kind": "dmnn", "k": 10}, data={"batch_size": 8}))
    assert parse_recipe(tiny_recipe_dict(similarity={"kind": "dmnn", "k": 5, "tau": 0.05})).similarity.tau == 0.05


@pytest.mark.parametrize("arch", ["resnet18", "torchvision:", "not a module:fn", "a.b:c-d"])
def test_bad_arch_spec(arch):
    with pytest.raises(RecipeError, match="guide.arch"):
        parse_recipe(tiny_recipe_dict(guide={"arch": arch}))


def test_data_path_rules():
    with pytest.raises(RecipeError, match="source 'npz' needs a path"):
        parse_recipe(tiny_recipe_dict(data={"source": "npz"}))
    with pytest.raises(RecipeError, match="is built in and takes no path"):
        parse_recipe(tiny_recipe_dict(data={"source": "digits", "path": "x"}))


def test_relative_paths_resolve_against_recipe_folder(tmp_path, write_recipe):
    data = tiny_recipe_dict(data={"source": "npz", "path": "d.npz"}, guide={"checkpoint": "g.pt"})
    recipe = load_recipe(write_recipe(data))
    assert recipe.data.path == str(tmp_path / "d.npz")
    assert recipe.guide.checkpoint == str(tmp_path / "g.pt")


@pytest.mark.parametrize("task,source,message", [
    ("classification", "bible-kjv", "'bible-kjv' is text; task classification takes images"),
    ("causal-lm", "digits", "task causal-lm needs text"),
])
def test_task_and_data_must_agree(task, source, message):
    data = tiny_recipe_dict(task=task, data={"source": source})
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_guide_tokenizer_needs_an_hf_guide():
    data = tiny_recipe_dict(task="causal-lm", data={"source": "bible-kjv", "tokenizer": "guide"})
    with pytest.raises(RecipeError, match="data.tokenizer: 'guide' needs an hf: guide"):
        parse_recipe(data)


def test_unknown_task_and_token_mode_list_choices():
    with pytest.raises(RecipeError, match=r"task: Input should be 'classification', 'causal-lm' or 'sentence-embedding'.*"
                                          r"similarity.tokens: Input should be 'flatten' or 'per-token'"):
        parse_recipe(tiny_recipe_dict(task="lm", similarity={"tokens": "tokens"}))


def test_relative_hf_directory_and_tokenizer_resolve_against_the_recipe(write_recipe, tmp_path):
    data = tiny_recipe_dict(task="causal-lm", guide={"arch": "hf:./model", "kwargs": {}},
                            data={"source": "text", "path": "c.txt", "tokenizer": "tok"})
    recipe = load_recipe(write_recipe(data))
    assert recipe.guide.arch == f"hf:{tmp_path / 'model'}"
    assert recipe.data.tokenizer == str(tmp_path / "tok") and recipe.data.path == str(tmp_path / "c.txt")


def test_micro_batches_refused_for_independent_schedule():
    with pytest.raises(RecipeError, match="align.micro_batch_size: not available for the independent schedule"):
        parse_recipe(tiny_recipe_dict(align={"micro_batch_size": 8}, schedule={"kind": "independent"}))


def test_the_readme_full_recipe_parses_with_every_documented_field():
    import re as _re

    import yaml as _yaml

    from tests.conftest import REPO

    section = (REPO / "README.md").read_text().split("## Recipes", 1)[1].split("\n## ", 1)[0]
    block = _re.search(r"```yaml\n(.*?)```", section, _re.S).group(1)
    recipe = parse_recipe(_yaml.safe_load(block))
    assert recipe.baseline.runs == ["scratch", "distill"] and recipe.schedule.objective == "similarity"
    assert recipe.finetune.distill is None and recipe.data.seed is None
