"""theseus eval --runtime onnxruntime: an exported file judged on the test split its metadata names, as ONNX
Runtime's CPU provider runs it."""

import json

import pytest
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from tests.conftest import cli_conversion, tiny_recipe_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = cli_conversion(tmp_path_factory.mktemp("ort"), tiny_recipe_dict())[2]
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--json"])
    assert res.exit_code == 0, res.output
    return run, run / "target.onnx"


def _eval(*args: str) -> dict:
    res = runner.invoke(app, ["eval", *args, "--batch", "8", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_onnxruntime_reproduces_the_pytorch_metric_of_an_fp32_export(exported, monkeypatch):
    monkeypatch.setenv("THESEUS_LATENCY_BUDGET_S", "0")
    run, onnx_file = exported
    torch_eval = _eval(str(run), "--device", "cpu")
    ort_eval = _eval(str(onnx_file), "--runtime", "onnxruntime", "--threads", "1")
    assert ort_eval["data"] == torch_eval["data"] and ort_eval["metric"]["name"] == "accuracy"
    # the same test split and preprocessing: at most one example in 200 may flip on a float rounding tie
    assert abs(ort_eval["metric"]["value"] - torch_eval["metric"]["value"]) <= 1 / 200
    assert ort_eval["threads"] == 1 and ort_eval["runtime"].startswith("onnxruntime")
    assert set(ort_eval["latency"]) == {"1", "8"} and ort_eval["latency"]["1"]["median_ms"] > 0
    assert ort_eval["size_bytes"] == onnx_file.stat().st_size


def test_files_without_theseus_metadata_are_refused(exported, tmp_path):
    import onnx

    _, onnx_file = exported
    bare = onnx.load(str(onnx_file))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    for name, message in (("bare.onnx", "carries no theseus target metadata"), ("junk.onnx", "not a readable ONNX file"),
                          ("missing.onnx", "ONNX file not found")):
        res = runner.invoke(app, ["eval", str(tmp_path / name), "--runtime", "onnxruntime"])
        assert res.exit_code == 4 and message in res.output, res.output
    res = runner.invoke(app, ["eval", str(onnx_file), "--runtime", "tflite"])
    assert res.exit_code == 2 and "choose pytorch or onnxruntime" in res.output  # a usage error
