"""Files written by the flat layout (theseus 0.1, before the subpackages) still load: a saved target and an
``export --format hf`` directory whose ``modeling_theseus.py`` imports ``theseus_cli.plan``. The fixtures
were made by that version (``tests/fixtures/flat_layout``), with its outputs on fixed inputs."""

import shutil
import warnings

import pytest
import torch

from tests.conftest import REPO
from theseus_cli import load_target

FIXTURES = REPO / "tests" / "fixtures" / "flat_layout"


def test_a_target_saved_by_the_flat_layout_loads_and_computes_the_same():
    model = load_target(FIXTURES / "cnn_lowrank.safetensors")
    io = torch.load(FIXTURES / "cnn_lowrank_io.pt", weights_only=True)
    assert model.theseus_meta.meta_version == 1 and model.theseus_meta.guide.arch == "theseus_cli.zoo:cnn_small"
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["y"])


def test_an_hf_directory_exported_by_the_flat_layout_loads_with_its_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / "gpt2_rnn_hf", folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True).eval()
    assert any("theseus_cli.plan moved" in str(w.message) for w in caught)
    assert type(model.transformer.h[0].attn).__name__ == "ElmanRNN"
    io = torch.load(FIXTURES / "gpt2_rnn_io.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(io["ids"]).logits, io["logits"])


def test_a_target_of_a_newer_metadata_version_is_one_line_naming_the_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from theseus_cli.errors import ModelError

    src = FIXTURES / "cnn_lowrank.safetensors"
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    meta["theseus"] = meta["theseus"].replace('{', '{"meta_version": 99, ', 1)
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match=r"t.safetensors: target metadata version 99 .*upgrade") as err:
        load_target(tmp_path / "t.safetensors")
    assert "\n" not in str(err.value)
