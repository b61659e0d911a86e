"""Compressive replacements end to end: convert, reload, export to ONNX with its parity check (a CNN whose convolutions
became separable and low-rank; a GPT-2 whose attention became linear attention, chunked causal form)."""

import copy
import json
import unittest.mock

import pytest
import torch
import yaml
from typer.testing import CliRunner

from theseus_cli import load_target
from theseus_cli.cli.app import app
from theseus_cli.replacements.linear_attention import LinearAttention
from tests.conftest import cli_conversion, tiny_recipe_dict
from tests.e2e.test_cli_transformers import GPT2

runner = CliRunner()


def test_separable_and_lowrank_conv_target_is_smaller_reloads_and_exports(tmp_path):
    recipe = tiny_recipe_dict(replace=[{"match": "re:0", "with": "lowrank_conv", "params": {"rank_ratio": 0.5, "init": "svd"}},
                                       {"match": "re:3", "with": "separable_conv", "params": {"norm": True, "activation": "relu"}}])
    _, _, run, report = cli_conversion(tmp_path, recipe)
    assert report["params"]["target"] < report["params"]["guide"]
    saved = load_target(run).state_dict()
    with unittest.mock.patch("theseus_cli.replacements.rank.svd_factors", side_effect=AssertionError("svd ran")):
        model = load_target(run)  # the file's weights follow: no SVD of the random rebuilt guide
    assert [type(model.get_submodule(p)).__name__ for p in ("0", "3")] == ["LowRankConv", "SeparableConv"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["parity"]["passed"]


def test_linear_attention_gpt2_converts_and_exports_with_a_dynamic_sequence_axis(tmp_path):
    """With the feature map the edge recipe ships (hedgehog); both maps' ONNX graphs are checked against the
    quadratic reference in tests/unit/replacements/test_linear_attention.py."""
    import onnxruntime as ort

    feature_map = "hedgehog"
    recipe = copy.deepcopy(GPT2)
    recipe["replace"] = [{"match": "GPT2Attention", "with": "linear_attention", "align_up": 1,
                          "params": {"feature_map": feature_map, "chunk": 4}}]
    path = tmp_path / "la.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    model = load_target(tmp_path / "run")
    assert all(isinstance(model.get_submodule(f"transformer.h.{i}.attn"), LinearAttention) for i in range(2))
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    session = ort.InferenceSession(info["out"], providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(3))  # 11: not a multiple of 4
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-3)


def test_activation_svd_start_runs_through_convert_measures_each_stage_and_is_exact_at_full_rank(tmp_path, monkeypatch):
    """GPT-2's MLP projections (transformers' Conv1D) factorised at full rank from the activation-weighted SVD, no
    training: each stage measures its modules' inputs on the hybrid, and the target reproduces the guide; reloading
    the saved target computes nothing."""
    from theseus_cli.surgery import plan as plan_module

    recipe = copy.deepcopy(GPT2)
    recipe["replace"] = [{"match": r"re:transformer\.h\.\d+\.mlp\.(c_fc|c_proj)", "with": "lowrank_linear",
                          "params": {"rank_ratio": 1.0, "init": "activation_svd", "calibration": 32}}]
    recipe["align"], recipe["finetune"] = {"epochs": 0}, {"epochs": 0}
    measured = []
    real = plan_module.input_moments

    def counting(model, paths, batches):
        batches = list(batches)
        measured.append((paths, sum(len(b) for b in batches)))
        return real(model, paths, batches)

    monkeypatch.setattr(plan_module, "input_moments", counting)
    path = tmp_path / "asvd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "run"), "--device", "cpu",
                              "--quiet", "--no-latency"])
    assert res.exit_code == 0, res.output
    assert [paths for paths, _ in measured] == [[f"transformer.h.{i}.mlp.{m}"] for i in (0, 1) for m in ("c_fc", "c_proj")]
    assert all(n == 32 for _, n in measured)
    metric = json.loads((tmp_path / "run" / "report.json").read_text())["metric"]
    assert metric["target"] == pytest.approx(metric["guide"], rel=1e-4)
    measured.clear()
    load_target(tmp_path / "run")
    assert measured == []
