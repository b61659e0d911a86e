"""Checkpoints from other codebases or for other label sets: key_map, ignore_keys, head reset."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from theseus_cli.config.recipe import parse_recipe, with_key_map
from theseus_cli.errors import ModelError, RecipeError
from theseus_cli.models.build import load_guide_fitted, resolve_checkpoint
from theseus_cli.models.checkpoint_fit import CheckpointFit, key_differences, rebuild_head, rename_keys
from theseus_cli.target_meta import HeadSpec
from theseus_cli.zoo import cnn_small
from tests.conftest import tiny_recipe_dict

ARCH = "theseus_cli.zoo:cnn_small"


def _foreign(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as another codebase might name it: ``features._<index>.<tensor>``."""
    return {f"features._{k}": v.clone() for k, v in model.state_dict().items()}


def test_rules_apply_in_order_to_each_key_and_count_what_they_renamed():
    state = {"_blocks.0._bn1.weight": torch.zeros(1), "_blocks.3._bn1.weight": torch.ones(1), "_fc.bias": torch.zeros(2)}
    out, counts = rename_keys(state, ((r"^(_blocks\.\d+\.)_bn1\.", r"\1bn2."), (r"^_blocks\.3\.", "blocks.2.0."),
                                      (r"^_nothing\.", "x.")))
    assert sorted(out) == ["_blocks.0.bn2.weight", "_fc.bias", "blocks.2.0.bn2.weight"]
    assert torch.equal(out["blocks.2.0.bn2.weight"], torch.ones(1))
    assert [c["keys"] for c in counts] == [2, 1, 0]
    with pytest.raises(ModelError, match="both become 'w'"):
        rename_keys({"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, ((r"^[ab]\.", ""),))


def test_a_key_map_loads_a_foreign_checkpoint_exactly(tmp_path):
    model = cnn_small(width=4)
    save_file(_foreign(model), str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelError, match=r"keys differ like 'features\.' ↔ .*guide.key_map"):
        load_guide_fitted(ARCH, {"width": 4}, tmp_path / "foreign.safetensors", 0)
    fit = CheckpointFit(key_map=((r"^features\._", ""),))
    loaded, report = load_guide_fitted(ARCH, {"width": 4}, tmp_path / "foreign.safetensors", 5, fit=fit)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert report.renamed == [{"rule": r"re:^features\._ → ", "keys": len(model.state_dict())}]


def test_differences_name_the_renaming_most_keys_need():
    missing = [f"blocks.{i}.conv.weight" for i in range(6)] + ["head.weight"]
    unexpected = [f"_blocks.{i}.conv.weight" for i in range(6)] + ["fc.weight"]
    assert key_differences(missing, unexpected)[0] == "'_blocks.' ↔ 'blocks.' (6 keys)"


def test_ignored_keys_may_be_missing_unexpected_or_mismatched_and_keep_their_init(tmp_path):
    state = cnn_small(width=4).state_dict()
    state.pop("8.bias")
    state["aux.weight"] = torch.zeros(3)
    state["0.weight"] = torch.zeros(5)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelError, match=r"fit the architecture: unexpected keys: aux.weight; shape mismatch: 0.weight"):
        load_guide_fitted(ARCH, {"width": 4}, tmp_path / "odd.safetensors", 0, fit=CheckpointFit(ignore_keys=("8.bias",)))
    fit = CheckpointFit(ignore_keys=("8.bias", "re:aux\\..*", "0.weight"))
    loaded, report = load_guide_fitted(ARCH, {"width": 4}, tmp_path / "odd.safetensors", 0, fit=fit)
    torch.manual_seed(0)
    fresh = cnn_small(width=4)
    assert torch.equal(loaded.state_dict()["0.weight"], fresh.state_dict()["0.weight"])  # the seeded init, not zeros
    assert report.ignored == {"unexpected": ["aux.weight"], "mismatched": ["0.weight"], "missing": ["8.bias"]}


def test_a_1000_class_head_is_reset_for_the_datas_classes_and_rebuilt_from_metadata(tmp_path):
    big = cnn_small(num_classes=1000, width=4)
    save_file(big.state_dict(), str(tmp_path / "g1000.safetensors"))
    fit = CheckpointFit(head="reset", num_classes=10)
    guide, report = load_guide_fitted(ARCH, {"num_classes": 1000, "width": 4}, tmp_path / "g1000.safetensors", 0, fit=fit)
    assert report.head == {"path": "8", "classes_before": 1000, "classes": 10, "dropped_keys": ["8.bias", "8.weight"]}
    assert guide.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    body = {k: v for k, v in big.state_dict().items() if not k.startswith("8.")}
    assert all(torch.equal(guide.state_dict()[k], v) for k, v in body.items())  # the rest is the checkpoint's
    rebuilt = rebuild_head(cnn_small(num_classes=1000, width=4), HeadSpec(path="8", classes=10))
    assert rebuilt.state_dict()["8.weight"].shape == (10, 8)
    with pytest.raises(ModelError, match="head_module: '0' is a Conv2d"):
        load_guide_fitted(ARCH, {"width": 4}, None, 0, fit=CheckpointFit(head="reset", head_module="0", num_classes=3))


def test_recipe_fields_and_the_cli_form_are_checked(tmp_path):
    bad = tiny_recipe_dict(guide={"arch": ARCH, "key_map": [{"match": "^_fc", "to": "fc"}], "head": "drop"})
    with pytest.raises(RecipeError) as err:
        parse_recipe(bad)
    assert "guide.key_map[0].match" in str(err.value) and "guide.head" in str(err.value) and "'keep' or 'reset'" in str(err.value)
    recipe = parse_recipe(tiny_recipe_dict(guide={"arch": ARCH, "key_map": [{"match": "re:^a", "to": "b"}]}))
    more = with_key_map(recipe, [r"re:^_fc\.=>fc."])
    assert [(r.match, r.to) for r in more.guide.key_map] == [("re:^a", "b"), (r"re:^_fc\.", "fc.")]
    for text, reason in (("^_fc=>fc", "must be a 're:<regex>' pattern"), ("re:^_fc", "write it as"), ("re:(=>x", "does not compile")):
        with pytest.raises(RecipeError, match=rf"--key-map .* \(rule 1\): .*{reason}"):
            with_key_map(recipe, [text])
    with pytest.raises(ModelError, match="package 'no_such_pkg' is not installed"):
        resolve_checkpoint("pkg:no_such_pkg/w.pth")
