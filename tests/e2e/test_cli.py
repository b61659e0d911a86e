"""End to end through the real CLI on real (small) data: digits, a tiny CNN, CPU."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import theseus_cli
from theseus_cli.cli.app import app
from theseus_cli.data.dataset import load_dataset
from theseus_cli.config.recipe import load_recipe
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One tiny conversion with a trained guide and the baseline, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("run")
    recipe = tmp / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(tiny_recipe_dict()))
    guide = tmp / "guide.safetensors"
    res = runner.invoke(app, ["train-guide", "--recipe", str(recipe), "--out", str(guide), "--epochs", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = tmp / "out"
    res = runner.invoke(app, ["convert", str(guide), "--recipe", str(recipe), "--out", str(out), "--baseline", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return tmp, recipe, guide, out, res.output


def test_convert_writes_target_report_and_plot(converted):
    _, recipe, guide, out, output = converted
    assert {p.name for p in out.iterdir()} == {"target.safetensors", "report.json", "alignment.png"}
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["recipe_hash"] == load_recipe(recipe).digest()
    assert report["guide"]["trained"] and report["guide"]["checkpoint"] == str(guide)
    assert report["versions"]["torch"] == torch.__version__ and report["device"] == "cpu" and report["seed"] == 0
    assert [s["introduced"] for s in report["stages"]] == [["0"], ["3"]]
    assert [s["trained"] for s in report["stages"]] == [["0"], ["0", "3"]]
    assert all(len(s["losses"]) == s["steps"] == 3 for s in report["stages"])
    assert set(report["similarity"]["after_alignment"]) == {"0", "3"}
    acc = report["metric"]
    assert all(0 <= acc[k] <= 1 for k in ("guide", "target", "target_after_alignment", "baseline"))
    assert report["steps"]["baseline"] == report["steps"]["alignment"] + report["steps"]["finetune"]
    assert report["params"]["target"] > report["params"]["guide"]
    assert "NoT target" in output and "baseline: from scratch" in output and "baseline: distilled from the guide" in output


def test_target_metadata_holds_recipe_and_guide_spec(converted):
    _, recipe, _, out, _ = converted
    with safe_open(str(out / "target.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["theseus"])
    assert meta["guide"]["arch"] == "theseus_cli.zoo:cnn_small"
    assert meta["recipe"] == load_recipe(recipe).resolved()
    assert [e["path"] for e in meta["entries"]] == ["0", "3"]


def test_load_target_round_trip_is_exact(converted):
    tmp, recipe, _, out, _ = converted
    model = theseus_cli.load_target(out)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    data = load_dataset(load_recipe(recipe).data, 0)
    with torch.no_grad():
        logits = model(data.x_test)
    accuracy = (logits.argmax(1) == data.y_test).sum().item() / data.y_test.numel()
    report = json.loads((out / "report.json").read_text())
    assert accuracy == pytest.approx(report["metric"]["target"], abs=1e-9)
    again = theseus_cli.load_target(out / "target.safetensors")
    with torch.no_grad():
        assert torch.equal(again(data.x_test), logits)


def test_existing_output_dir_is_refused_without_overwrite(converted):
    tmp, recipe, guide, out, _ = converted
    res = runner.invoke(app, ["convert", str(guide), "--recipe", str(recipe), "--out", str(out)])
    assert res.exit_code == 8 and "not empty (use --resume" in res.output


def test_inspect_table_and_json(converted):
    _, recipe, guide, _, _ = converted
    res = runner.invoke(app, ["inspect", str(guide), "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    for text in ("lowrank_linear", "kept", "4×8×8", "replace[0]", "params: guide", "2 stages"):
        assert text in res.output
    res = runner.invoke(app, ["inspect", str(guide), "--recipe", str(recipe), "--json"])
    plan = json.loads(res.stdout)
    assert [e["path"] for e in plan["entries"]] == ["0", "3"]
    assert plan["entries"][0]["input_shape"] == [1, 8, 8] and plan["entries"][0]["output_shape"] == [4, 8, 8]
    assert plan["guide"]["trained"] is True and plan["target_params"] > plan["guide_params"]


def test_untrained_guide_when_no_checkpoint(write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict(finetune={"epochs": 0}))
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["guide"]["trained"] is False and report["steps"]["finetune"] == 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["inspect", "--recipe", "missing.yaml"], 3, "missing.yaml: recipe file not found"),
        (["inspect", "nope.pt", "--recipe", "{recipe}"], 4, "nope.pt: checkpoint not found"),
        (["convert", "--recipe", "{recipe}", "--out", "{tmp}/o", "--device", "cuda:7"], 7, "--device cuda:7"),
    ],
)
def test_errors_are_one_line_with_distinct_exit_codes(args, code, message, write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict())
    args = [a.format(recipe=recipe, tmp=tmp_path) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == code
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_match_errors_exit_5(write_recipe):
    recipe = write_recipe(tiny_recipe_dict(replace=[{"match": "re:conv.*", "with": "lowrank_linear"}]))
    res = runner.invoke(app, ["inspect", "--recipe", str(recipe)])
    assert res.exit_code == 5 and "matched no module" in res.output


def test_real_entry_point_exit_code_and_stderr(write_recipe, tmp_path):
    recipe = write_recipe("guide: {arch: x}\n")
    proc = subprocess.run([sys.executable, "-m", "theseus_cli", "inspect", "--recipe", str(recipe)],
                          capture_output=True, text=True, env={"CI": "true", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 3
    assert proc.stdout == "" and proc.stderr.startswith("error: ") and "guide.arch" in proc.stderr
    assert "replace: Field required" in proc.stderr


def test_recipe_switches_reach_the_run(write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict(bn_recalibration={"enabled": False}, baseline={"enabled": True, "lr": 3e-3},
                                           finetune={"label_smoothing": 0.1}))
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["bn_recalibration"] == {"enabled": False, "layers": 0}
    assert report["baseline"]["lr"] == 3e-3 and report["metric"]["baseline"] is not None  # recipe enables it
    assert report["recipe"]["finetune"]["label_smoothing"] == 0.1


@pytest.mark.parametrize("similarity", [{"kind": "ucka"}, {"kind": "dmnn", "k": 5, "tau": 0.1}])
def test_every_similarity_converts_and_reports_all_metrics(similarity, write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict(similarity=similarity, finetune={"epochs": 0}))
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["similarity"]["optimised"] == similarity["kind"]
    for layer in report["similarity"]["after_alignment"].values():
        assert set(layer) == {"cka", "ucka", "mknn"}
    assert all(s["losses"] and all(v == v for v in s["losses"]) for s in report["stages"])  # no NaN


@pytest.mark.parametrize("schedule, trained", [({"kind": "independent"}, [["0"], ["3"]]),
                                               ({"kind": "joint"}, [["0", "3"]]),
                                               ({"kind": "progressive", "order": "reverse"}, [["3"], ["0", "3"]])])
def test_schedules_run_end_to_end_and_inspect_shows_them(schedule, trained, write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict(schedule=schedule, finetune={"epochs": 0}))
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [s["trained"] for s in report["stages"]] == trained
    assert [s["trained"] for s in report["plan"]["stages"]] == trained
    res = runner.invoke(app, ["inspect", "--recipe", str(recipe)])
    assert res.exit_code == 0 and f"stages: {schedule['kind']}" in res.output


def test_overrides_that_select_no_stage_fail_before_training(write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict(align={"overrides": [{"stage": 9, "lr": 1e-3}, {"match": "re:fc.*", "epochs": 1}]}))
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 5
    assert "align.overrides[0].stage: 9, but the plan has 2 stages" in res.output
    assert "align.overrides[1].match: 're:fc.*' matches no replaced module" in res.output


def test_stage_results_record_overrides_in_the_report(write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict(align={"overrides": [{"stage": 2, "lr": 2e-4, "epochs": 2}]}, finetune={"epochs": 0}))
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"])
    report = json.loads(res.stdout)
    assert [(s["lr"], s["epochs"], s["steps"]) for s in report["stages"]] == [(1e-3, 1, 3), (2e-4, 2, 6)]


def test_no_latency_reports_size_only_and_refuses_a_latency_gate(write_recipe, tmp_path):
    path = write_recipe(tiny_recipe_dict())
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "o"), "--device", "cpu", "--json",
                              "--no-latency"])
    assert res.exit_code == 0, res.output
    deployment = json.loads(res.stdout)["deployment"]
    assert deployment["target"]["params"] > 0 and "latency" not in deployment["target"]
    assert not any(key.startswith("latency") for key in deployment["ratios"])
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "p"), "--device", "cpu",
                              "--no-latency", "--max-latency-ms", "5"])
    assert res.exit_code == 2 and "--max-latency-ms" in res.output and not (tmp_path / "p" / "report.json").exists()
