"""Baselines side by side (scratch, guide-init, distill), progressive distillation and fine-tuning with a teacher."""

from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.cli.app import app
from theseus_cli.config.recipe import parse_recipe
from tests.conftest import tiny_recipe_dict

runner = CliRunner()
FEW_LABELS = {"source": "digits", "train_limit": 400, "label_limit": 100, "test_limit": 200, "batch_size": 32,
              "eval_batch_size": 256}


class _CountingProgress:
    """Counts each bar's advances by description (one advance per optimiser step)."""

    def __init__(self):
        self.steps: Counter = Counter()

    def task(self, description: str, total: int):
        counter, steps = description, self.steps

        class _Bar:
            def advance(self, n: int = 1, **info: float) -> None:
                steps[counter] += n

            def note(self, text: str) -> None:
                pass

            def done(self, text: str = "", line: bool = True) -> None:
                pass

        return _Bar()

    def log(self, message: str) -> None:
        pass


def _convert(tmp: Path, **sections) -> tuple[dict, Counter]:
    progress = _CountingProgress()
    recipe = parse_recipe(tiny_recipe_dict(data=FEW_LABELS, **sections))
    report = run_conversion(recipe, tmp / "run", ConvertOptions(device="cpu", baseline=True, progress=progress,
                                                                latency=False))
    return report, progress.steps


def test_every_baseline_runs_exactly_the_conversions_steps_and_is_reported(tmp_path):
    report, steps = _convert(tmp_path, baseline={"runs": ["scratch", "guide-init", "distill"]})
    total = report["steps"]["alignment"] + report["steps"]["finetune"]
    assert total == sum(n for d, n in steps.items() if d.startswith(("stage", "fine-tune")))
    assert set(report["baselines"]) == {"scratch", "guide-init", "distill"}
    bars = {d: n for d, n in steps.items() if d.startswith("baseline")}
    assert len(bars) == 3 and set(bars.values()) == {total}
    for run, b in report["baselines"].items():
        assert b["steps"] == total and len(b["epoch_losses"]) >= 1 and b["seconds"] > 0
        assert report["metric"]["baselines"][run] == b["accuracy"]
    assert report["metric"]["baseline"] == report["baselines"]["scratch"]["accuracy"] == report["baseline"]["accuracy"]
    assert report["baselines"]["distill"]["distill"] == {"weight": 0.5, "temperature": 4.0, "inputs": "all"}
    # the distill run starts from the scratch run's weights and sees the same labelled batches: only its objective
    # differs, so its losses differ (the teacher term) while the scratch run's are today's naive baseline's
    assert report["baselines"]["distill"]["epoch_losses"] != report["baselines"]["scratch"]["epoch_losses"]


def test_scratch_figures_do_not_depend_on_which_other_baselines_run(tmp_path):
    alone, _ = _convert(tmp_path / "a", baseline={"runs": ["scratch"]})
    together, _ = _convert(tmp_path / "b", baseline={"runs": ["distill", "scratch"]})
    timeless = lambda b: {k: v for k, v in b.items() if k != "seconds"}  # noqa: E731
    assert timeless(alone["baselines"]["scratch"]) == timeless(together["baselines"]["scratch"])
    assert alone["metric"]["target"] == together["metric"]["target"]


def test_progressive_distillation_trains_stages_on_the_output_kl(tmp_path):
    report, _ = _convert(tmp_path, schedule={"objective": "distill", "temperature": 2.0}, baseline={"runs": ["scratch"]})
    assert report["alignment_objective"] == "distill"
    for stage in report["stages"]:
        assert list(stage["final_layer_losses"]) == ["output"]
        assert stage["steps"] == 3 and all(v >= 0 for v in stage["losses"])
    # the layer similarities are still measured at the replaced modules, whatever the stages optimised
    assert set(report["similarity"]["after_alignment"]) == {p for s in report["stages"] for p in s["aligned"]}


def test_finetuning_with_a_teacher_records_it_and_changes_the_target(tmp_path):
    plain, _ = _convert(tmp_path / "a", baseline={"runs": ["scratch"]})
    taught, steps = _convert(tmp_path / "b", baseline={"runs": ["scratch"]},
                             finetune={"distill": {"weight": 0.7, "inputs": "labelled"}})
    assert plain["finetune"]["distill"] is None
    assert taught["finetune"]["distill"] == {"weight": 0.7, "temperature": 4.0, "inputs": "labelled"}
    assert taught["finetune"]["epoch_losses"] != plain["finetune"]["epoch_losses"]
    assert steps["fine-tune target"] == taught["steps"]["finetune"]


def test_the_cli_prints_every_baseline_beside_not(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(data=FEW_LABELS)))
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "run"), "--device", "cpu",
                              "--baseline", "--no-latency"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for row in ("NoT target", "baseline: from scratch", "baseline: distilled from the guide"):
        assert row in res.output


@pytest.mark.parametrize("sections, says", [
    ({"baseline": {"distill": {"temperature": 0}}}, "baseline.distill.temperature"),
    ({"finetune": {"distill": {"weight": 1.5}}}, "finetune.distill.weight"),
    ({"baseline": {"runs": ["scratch", "kd"]}}, "'scratch', 'guide-init' or 'distill'"),
    ({"baseline": {"runs": ["scratch", "scratch"]}}, "each baseline once"),
    ({"baseline": {"runs": ["scratch"], "init": "guide"}}, "give runs only"),
    ({"schedule": {"objective": "distill", "kind": "independent"}}, "independent schedule"),
    ({"schedule": {"objective": "distill"}, "align": {"cache_guide": True}}, "align.cache_guide"),
])
def test_bad_distillation_settings_are_one_line_recipe_errors(tmp_path, sections, says):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**sections)))
    res = runner.invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 3
    assert says in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_progressive_distillation_is_refused_where_it_is_undefined():
    transfer = tiny_recipe_dict(schedule={"objective": "distill"})
    del transfer["replace"]
    transfer["target"] = {"arch": "theseus_cli.zoo:mlp", "kwargs": {}, "map": [{"target": "a", "guide": "b"}]}
    text = tiny_recipe_dict(task="sentence-embedding", schedule={"objective": "distill"},
                            data={"source": "bible-kjv"})
    for data, why in ((transfer, "in-place replace rules"), (text, "no output distribution")):
        with pytest.raises(Exception) as err:
            parse_recipe(data)
        assert why in str(err.value) and "\n" not in str(err.value)


def test_older_init_spelling_still_loads():
    assert parse_recipe(tiny_recipe_dict(baseline={"init": "guide"})).baseline.runs == ["guide-init"]
    recipe = parse_recipe(tiny_recipe_dict(baseline={"init": "scratch"}))
    assert parse_recipe(recipe.resolved()).baseline.runs == ["scratch"]  # a dumped recipe parses again
