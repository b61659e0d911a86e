"""theseus eval: the metric of a converted target or a guide checkpoint, with params, FLOPs and latency."""

import json

import pytest
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.deploy.evaluate import data_override
from theseus_cli.config.recipe import DataConfig
from tests.conftest import cli_conversion, tiny_recipe_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return cli_conversion(tmp_path_factory.mktemp("eval"), tiny_recipe_dict(), 2)


def test_eval_of_a_target_reproduces_the_conversion_report(run):
    _, _, out, report = run
    res = runner.invoke(app, ["eval", str(out), "--json", "--batch", "16"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["kind"] == "target" and ev["metric"]["name"] == "accuracy"
    assert ev["metric"]["value"] == pytest.approx(report["metric"]["target"], abs=1e-9)
    assert ev["params"] == report["params"]["target"]
    assert ev["flops_per_example"] == report["deployment"]["target"]["flops_per_example"]
    assert set(ev["latency"]) == {"1", "16"} and ev["latency"]["16"]["median_ms"] > 0 and ev["device"] == "cpu"


def test_eval_of_a_guide_checkpoint_needs_its_recipe(run):
    recipe, guide, _, report = run
    res = runner.invoke(app, ["eval", str(guide), "--recipe", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["kind"] == "guide" and ev["metric"]["value"] == pytest.approx(report["metric"]["guide"], abs=1e-9)
    assert ev["params"] == report["params"]["guide"]
    res = runner.invoke(app, ["eval", str(guide)])
    assert res.exit_code == 3 and "--recipe" in res.output


def test_eval_on_other_data_keeps_the_targets_input_settings(run, tmp_path):
    _, _, out, _ = run
    res = runner.invoke(app, ["eval", str(out), "--data", "mnist-5k"])
    assert res.exit_code == 6 and "(1, 28, 28)" in res.output and "(1, 8, 8)" in res.output
    res = runner.invoke(app, ["eval", str(out), "--data", str(tmp_path / "nothing")])
    assert res.exit_code == 6 and "neither a built-in source" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert res.exit_code == 4 and "not found" in res.output


def test_data_override_infers_the_source_from_a_path(tmp_path):
    cfg = DataConfig(source="digits", image_size=8, test_limit=5)
    (tmp_path / "a.npz").write_bytes(b"")
    assert data_override(cfg, str(tmp_path / "a.npz")).source == "npz"
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    moved = data_override(cfg, str(tmp_path / "idx"))
    assert moved.source == "idx" and moved.image_size == 8 and moved.test_limit == 5
    assert data_override(cfg, "fashion-mnist").path is None
