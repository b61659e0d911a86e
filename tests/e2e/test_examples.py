from tests.conftest import REPO
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = REPO / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_library_conversion_example_runs_and_reloads_exactly(tmp_path):
    result = _load("library_conversion").main(tmp_path)
    acc = result["report"]["metric"]
    assert result["reloaded_accuracy"] == pytest.approx(acc["target"], abs=1e-12)
    assert acc["guide"] > 0.8  # a real guide on real digits
    assert acc["target"] > 0.5  # the all-Linear target learned the task, not chance


def test_gpt2_to_rnn_example_generates_with_the_reloaded_rnn_target(tmp_path):
    import torch

    result = _load("gpt2_to_rnn_generate").main(tmp_path)
    m = result["report"]["metric"]
    assert m["guide"] < 2000 and m["target"] < 2000  # trained models, far below the 50,257 of a uniform guess
    target, gen, ids = result["target"], result["generated"], result["prompt_ids"]
    assert all(type(b.attn).__name__ == "ElmanRNN" for b in target.transformer.h)
    assert gen.shape[1] == ids.shape[1] + 12 and torch.equal(gen[0, : ids.shape[1]], ids[0])
    with torch.no_grad():  # greedy decoding picked the target's own argmax at each step
        logits = target(gen[:, :-1]).logits
    assert torch.equal(logits[0, ids.shape[1] - 1 :].argmax(-1), gen[0, ids.shape[1] :])


def test_deploy_onnx_example_gets_the_pytorch_accuracy_from_onnx_runtime(tmp_path):
    result = _load("deploy_onnx").main(tmp_path)
    acc = result["report"]["metric"]
    assert acc["target"] > 0.5  # a trained target, not chance
    assert result["onnx_accuracy"] == pytest.approx(acc["target"], abs=1.5 / 360)  # at most one borderline image flips
    assert result["export"]["parity"]["passed"]
