"""A fixed seed on CPU gives the same conversion twice: same weights, same losses, same metrics."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.config.recipe import load_recipe
from tests.conftest import tiny_recipe_dict


def test_same_seed_same_result_and_another_seed_differs(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(baseline={"enabled": True})))
    recipe = load_recipe(path)
    a = run_conversion(recipe, tmp_path / "a", ConvertOptions(device="cpu"))
    b = run_conversion(recipe, tmp_path / "b", ConvertOptions(device="cpu"))
    for key in ("guide", "target_after_alignment", "target", "baseline"):
        assert a["metric"][key] == b["metric"][key]
    assert [s["losses"] for s in a["stages"]] == [s["losses"] for s in b["stages"]]
    assert a["finetune"]["epoch_losses"] == b["finetune"]["epoch_losses"]
    wa, wb = load_file(tmp_path / "a" / "target.safetensors"), load_file(tmp_path / "b" / "target.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    path.write_text(yaml.safe_dump(tiny_recipe_dict(seed=1)))
    c = run_conversion(load_recipe(path), tmp_path / "c", ConvertOptions(device="cpu"))
    wc = load_file(tmp_path / "c" / "target.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert c["stages"][0]["losses"] != pytest.approx(a["stages"][0]["losses"], abs=1e-9)
