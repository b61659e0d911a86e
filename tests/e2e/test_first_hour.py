"""The first hour with the tool, through the real CLI: what a new user meets reading the README (issue 36, point 6)."""

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args, cwd):
    """The CLI in this process (CliRunner keeps stderr apart; no terminal, so progress comes as lines), from ``cwd``:
    a fresh interpreter per call would cost the suite seconds each."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        res = runner.invoke(app, [str(a) for a in args], env={"CI": "true"})
    finally:
        os.chdir(here)
    return _Result(res.exit_code, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny conversion through the CLI under CI=true, with its stderr, and its ONNX export."""
    tmp = tmp_path_factory.mktemp("first_hour")
    (tmp / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict()))
    run = _cli("convert", "--recipe", "r.yaml", "--out", "run", "--device", "cpu", "--baseline", cwd=tmp)
    assert run.returncode == 0, run.stderr
    export = _cli("export", "run", "--format", "onnx", cwd=tmp)
    assert export.returncode == 0, export.stderr
    return tmp, run


def test_version_and_short_help(tmp_path):
    from theseus_cli import __version__

    for flag in ("--version", "-V"):
        res = runner.invoke(app, [flag])
        assert res.exit_code == 0 and res.stdout.strip() == f"theseus {__version__}"
    res = runner.invoke(app, ["-h"])
    assert res.exit_code == 0 and "convert" in res.stdout and "inspect" in res.stdout
    assert runner.invoke(app, ["convert", "-h"]).exit_code == 0


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict()))
    for args in (["convert", "--recipe", "r.yaml", "--bogus"],
                 ["convert", "--recipe", "r.yaml", "--out", "o", "--no-latency", "--max-latency-ms", "5"],
                 ["transport", "--recipe", "r.yaml", "--base-a", "a", "--tuned-a", "a", "--base-b", "b", "--out", "o",
                  "--alpha", "1", "--alpha-grid", "0:1:0.5"]):
        res = _cli(*args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "╭" not in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_help_shows_flags_plainly_and_whole_at_80_columns(tmp_path):
    res = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0 and "<bool>" not in res.stdout and "…" not in res.stdout
    assert "--trust-checkpoint" in res.stdout and "--baseline " in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80


def test_progress_lines_without_a_terminal_and_the_summary_keeps_retention(converted):
    _, run = converted
    err = run.stderr
    for expected in ("plan: 2 modules to replace", "align: 2 stages", "stage 1/2 aligned (cka loss",
                     "stage 2/2 aligned", "fine-tune target: epoch 1/1", "baseline 1/2: target from scratch",
                     "baseline 2/2: target distilled from the guide", "profile: params, FLOPs and latency"):
        assert expected in err, expected
    assert all(line.endswith("]") or line.startswith("warning:") for line in err.splitlines())  # [elapsed] on each
    assert "~" in err and "left" in err  # an estimate of what is left
    assert "retention" in run.stdout and "target / guide" in run.stdout


def test_quiet_silences_progress_and_json_keeps_stdout_one_document(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict()))
    loud = _cli("convert", "--recipe", "r.yaml", "--out", "a", "--device", "cpu", "--json", "--no-latency", cwd=tmp_path)
    report = json.loads(loud.stdout)  # progress lines went to stderr
    assert "stage 1/2 aligned" in loud.stderr and report["wall_time"]["resumed"] is False
    quiet = _cli("convert", "--recipe", "r.yaml", "--out", "b", "--device", "cpu", "--json", "--quiet", "--no-latency",
                 cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    # an untrained guide is said once on stderr (not under --quiet), and always in the report
    assert "warning: the guide theseus_cli.zoo:cnn_small is untrained" in loud.stderr
    assert any("untrained" in w for w in json.loads(quiet.stdout)["warnings"])


def test_no_latency_prints_no_latency_columns(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict()))
    res = _cli("convert", "--recipe", "r.yaml", "--out", "o", "--device", "cpu", "--no-latency", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "latency" not in res.stdout and "b=-" not in res.stdout and "deployment cost" in res.stdout


def test_eval_names_the_runtime_a_file_needs(converted):
    tmp, _ = converted
    onnx = _cli("eval", "run/target.onnx", cwd=tmp)
    assert onnx.returncode == 2 and "this is an ONNX file: add --runtime onnxruntime" in onnx.stderr
    torch_file = _cli("eval", "run/target.safetensors", "--runtime", "onnxruntime", cwd=tmp)
    assert torch_file.returncode == 2 and "not ONNX" in torch_file.stderr and "DecodeError" not in torch_file.stderr
    assert torch_file.stderr.count("\n") == 1


def test_eval_against_another_file_reports_an_interleaved_ratio(converted):
    tmp, _ = converted
    res = _cli("eval", "run/target.onnx", "--runtime", "onnxruntime", "--against", "run/target.onnx", "--batch", "4",
               "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr
    ratios = json.loads(res.stdout)["against"]["ratios"]
    assert set(ratios) == {"1", "4"} and all(r["min"] <= r["median"] <= r["max"] and r["rounds"] >= 3
                                             for r in ratios.values())
    text = _cli("eval", "run", "--against", "run", cwd=tmp)
    assert text.returncode == 0 and "alternating rounds" in text.stdout


def test_torchscript_export_lets_no_torch_warning_through(converted):
    tmp, _ = converted
    res = _cli("export", "run", "--format", "torchscript", "--overwrite", cwd=tmp)
    assert res.returncode == 0 and "Warning" not in res.stderr, res.stderr


def test_int8_export_reports_size_and_interleaved_time_against_float(converted):
    tmp, _ = converted
    res = _cli("export", "run", "--quantize", "int8", "--max-metric-drop", "1", "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr
    q = json.loads(res.stdout)["quantization"]
    lat = q["int8_over_float"]["latency_b1"]
    assert q["int8_over_float"]["size"] == q["int8"]["size_bytes"] / q["float"]["size_bytes"]
    assert lat["min"] <= lat["median"] <= lat["max"] and lat["rounds"] >= 3
    assert ("not smaller" in " ".join(q["warnings"])) == (q["int8_over_float"]["size"] >= 1)


def test_int8_warnings_say_when_the_file_is_not_smaller_or_not_faster():
    from theseus_cli.deploy.quantize import int8_warnings

    judged = {"float": {"size_bytes": 37_000}, "int8": {"size_bytes": 47_000},
              "int8_over_float": {"size": 47 / 37, "latency_b1": {"median": 2.6, "min": 2.5, "max": 2.7, "rounds": 15}}}
    warnings = int8_warnings(judged)
    assert len(warnings) == 2 and "not smaller" in warnings[0] and "×2.60" in warnings[1]
    judged["int8_over_float"] = {"size": 0.4, "latency_b1": {"median": 0.5, "min": 0.4, "max": 0.6, "rounds": 15}}
    assert int8_warnings(judged) == []


@pytest.mark.parametrize("change,message", [
    ({"data": {"source": "fashion_mnist"}}, "data.source: Input should be"),
    ({"data": {"source": "text"}}, "data.path: source 'text' needs a path"),
    ({"guide": {"arch": "theseus_cli.zoo:resnet_smal"}}, "has no callable 'resnet_smal' (did you mean: resnet_small"),
])
def test_near_misses_get_a_did_you_mean_and_no_doubled_prefix(tmp_path, change, message):
    raw = tiny_recipe_dict()
    for key, value in change.items():
        raw[key] = {**raw[key], **value}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    res = _cli("inspect", "--recipe", "r.yaml", cwd=tmp_path)
    assert res.returncode in (3, 4) and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    if change["data" if "data" in change else "guide"].get("source") == "fashion_mnist":
        assert "(did you mean 'fashion-mnist'?)" in res.stderr
    assert "data: path:" not in res.stderr


def test_a_warmup_longer_than_the_finetuning_is_warned_about(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(finetune={"epochs": 2, "warmup_epochs": 5})))
    res = _cli("inspect", "--recipe", "r.yaml", cwd=tmp_path)
    assert res.returncode == 0
    assert "warning: r.yaml: finetune.warmup_epochs 5 is more than finetune.epochs 2" in res.stderr


def test_the_readme_library_example_names_its_guide_and_an_untrained_guide_warns(tmp_path):
    import warnings

    from safetensors.torch import save_model

    from theseus_cli import ConvertOptions, run_conversion
    from theseus_cli.config.recipe import parse_recipe
    from theseus_cli.errors import TheseusWarning
    from theseus_cli.models.build import build_model
    from tests.conftest import REPO

    assert 'ConvertOptions(checkpoint="guide.safetensors"' in (REPO / "README.md").read_text()
    raw = tiny_recipe_dict(finetune={"epochs": 0})
    with pytest.warns(TheseusWarning, match="is untrained: no checkpoint was given"):
        report = run_conversion(parse_recipe(raw), tmp_path / "a", ConvertOptions(device="cpu", latency=False))
    assert report["warnings"] and not report["guide"]["trained"]
    guide = tmp_path / "guide.safetensors"
    save_model(build_model(raw["guide"]["arch"], raw["guide"]["kwargs"], 0, "classification"), str(guide))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TheseusWarning)  # a given checkpoint: no warning
        report = run_conversion(parse_recipe(raw), tmp_path / "b", ConvertOptions(checkpoint=guide, device="cpu",
                                                                                  latency=False))
    assert report["warnings"] == [] and report["guide"]["trained"]


def test_terminal_bars_show_the_latest_loss():
    import io

    import torch
    from rich.console import Console

    from theseus_cli.cli.progress import RichProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    progress = RichProgress(console)
    bar = progress.task("fine-tune target", 10)
    bar.advance(loss=torch.tensor(0.1234))
    progress.progress.refresh()
    assert "loss 0.1234" in console.file.getvalue()
    bar.done()


def test_line_progress_estimates_what_is_left_from_an_injected_clock():
    import io

    from theseus_cli import LineProgress

    now = [0.0]
    out = io.StringIO()
    progress = LineProgress(out, every_s=10.0, clock=lambda: now[0])
    bar = progress.task("fine-tune target", 100)
    for _ in range(25):
        now[0] += 1.0
        bar.advance(loss=0.5)  # 25 s: two periodic lines (at 10 s and 20 s)
    bar.note("epoch 1/4, mean loss 0.5")  # the first note: always shown
    now[0] += 1.0
    bar.note("epoch 2/4, mean loss 0.4")  # 1 s later: sub-second epochs are not a line each
    bar.done()
    lines = out.getvalue().splitlines()
    assert not any("epoch 2/4" in line for line in lines)
    assert lines[0] == "fine-tune target: 10/100 steps, loss 0.5, 10 s, ~1 min 30 s left [10 s]"
    assert len(lines) == 4 and "25/100 steps, 25 s, ~1 min 15 s left" in lines[2]
    assert lines[3] == "fine-tune target: done, 25 steps, loss 0.5, 26 s [26 s]"
