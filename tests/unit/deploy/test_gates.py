"""CI quality gates: --min-retention and --max-latency-ms fail and pass at the right thresholds."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.errors import GateError
from theseus_cli.deploy.gates import Gates, evaluate_gates, raise_if_failed
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def _report(retention, latency_ms):
    return {"metric": {"name": "accuracy", "retention": retention}, "device": "cpu",
            "deployment": {"target": {"latency": {"1": {"median_ms": latency_ms}}, "latency_device": "cpu (2 threads)"}}}


@pytest.mark.parametrize("threshold,passed", [(0.9, True), (0.95, True), (0.951, False)])
def test_retention_gate_threshold_is_inclusive(threshold, passed):
    verdict = evaluate_gates(Gates(min_retention=threshold), _report(0.95, 1.0))
    assert verdict["passed"] is passed and verdict["checks"]["min_retention"]["value"] == 0.95


def test_latency_gate_and_the_one_line_reason():
    report = _report(0.99, 3.2)
    report["gates"] = evaluate_gates(Gates(min_retention=0.5, max_latency_ms=2.0), report)
    assert not report["gates"]["passed"] and report["gates"]["checks"]["min_retention"]["passed"]
    with pytest.raises(GateError) as err:
        raise_if_failed(report, "runs/x")
    msg = str(err.value)
    assert "--max-latency-ms 2" in msg and "3.2 ms" in msg and "min-retention" not in msg and "\n" not in msg
    assert err.value.exit_code == 10
    report["gates"] = evaluate_gates(Gates(max_latency_ms=5.0), report)
    raise_if_failed(report, "runs/x")  # passes: nothing raised


def test_missing_metric_fails_the_retention_gate():
    assert not evaluate_gates(Gates(min_retention=0.1), _report(None, 1.0))["passed"]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gates") / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(finetune={"epochs": 2})))
    return path


def _convert(recipe, out, *gates):
    return runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--json", *gates])


def test_cli_gates_exit_10_with_complete_files_and_pass_otherwise(recipe_file, tmp_path):
    res = _convert(recipe_file, tmp_path / "a", "--max-latency-ms", "1e-6", "--min-retention", "0")
    assert res.exit_code == 10, res.output
    assert "quality gate failed: --max-latency-ms" in res.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert not report["gates"]["passed"] and report["gates"]["checks"]["min_retention"]["passed"]
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"target.safetensors", "report.json", "alignment.png"}
    retention = report["metric"]["retention"]

    res = _convert(recipe_file, tmp_path / "b", "--max-latency-ms", "1e6", "--min-retention", f"{retention:.6f}")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # --json: stdout is the report alone
    assert out["gates"]["passed"] and set(out["gates"]["checks"]) == {"min_retention", "max_latency_ms"}

    res = _convert(recipe_file, tmp_path / "c", "--min-retention", f"{retention + 0.01:.6f}")
    assert res.exit_code == 10 and "--min-retention" in res.output


def test_without_gates_the_report_has_no_verdict(recipe_file, tmp_path):
    res = _convert(recipe_file, tmp_path / "a")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert "gates" not in report
    dep = report["deployment"]
    assert dep["guide"]["params"] == report["params"]["guide"] and dep["target"]["params"] == report["params"]["target"]
    assert set(dep["target"]["latency"]) == {"1", "64"} and dep["ratios"]["flops"] > 0
