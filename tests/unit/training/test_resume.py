import json

import pytest
import torch
from safetensors.torch import load_file

import theseus_cli.pipelines.convert as convert_module
from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.errors import OutputError
from theseus_cli.config.recipe import parse_recipe
from tests.conftest import tiny_recipe_dict


def _recipe(**kw):
    return parse_recipe(tiny_recipe_dict(guide={"kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}},
                                         align={"epochs": 2, "max_steps_per_epoch": 3}, **kw))


def _kill_at(monkeypatch, stage_index):
    real = convert_module.align_stage

    def align_or_die(index, *args, **kwargs):
        if index == stage_index:
            raise KeyboardInterrupt  # what SIGINT does mid-stage
        return real(index, *args, **kwargs)

    monkeypatch.setattr(convert_module, "align_stage", align_or_die)


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    recipe = _recipe()
    full = run_conversion(recipe, tmp_path / "full", ConvertOptions(device="cpu"))

    with monkeypatch.context() as m:
        _kill_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu"))
    assert (tmp_path / "killed" / ".resume" / "stages.pt").is_file()
    assert not (tmp_path / "killed" / "report.json").exists()

    calls = []
    real = convert_module.align_stage
    monkeypatch.setattr(convert_module, "align_stage", lambda i, *a, **k: calls.append(i) or real(i, *a, **k))
    resumed = run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu", resume=True))
    assert calls == [1]  # stage 0 was not redone
    strip = lambda stages: [{k: v for k, v in s.items() if k != "seconds"} for s in stages]  # noqa: E731
    assert strip(resumed["stages"]) == strip(full["stages"])
    assert resumed["metric"] == full["metric"]
    a, b = load_file(str(tmp_path / "full" / "target.safetensors")), load_file(str(tmp_path / "killed" / "target.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (tmp_path / "killed" / ".resume").exists()  # cleared once finished


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _kill_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_conversion(_recipe(), tmp_path / "o", ConvertOptions(device="cpu"))
    with pytest.raises(OutputError, match="made for a different recipe \(its resolved recipe hash"):
        run_conversion(_recipe(seed=5), tmp_path / "o", ConvertOptions(device="cpu", resume=True))


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    report = run_conversion(_recipe(), tmp_path / "o", ConvertOptions(device="cpu", resume=True))
    assert len(report["stages"]) == 2


def test_killed_transfer_resumes_to_the_same_result(tmp_path, monkeypatch):
    data = tiny_recipe_dict(align={"epochs": 1, "max_steps_per_epoch": 2})
    del data["replace"]
    data["guide"] = {"arch": "theseus_cli.zoo:resnet_small",
                     "kwargs": {"in_chans": 1, "widths": [4, 8], "blocks": [2, 2], "block": "bottleneck"}}
    data["target"] = {"arch": "theseus_cli.zoo:resnet_small", "kwargs": {"in_chans": 1, "widths": [4, 8], "blocks": [1, 1]},
                      "blocks": {"guide": "Bottleneck", "target": "BasicBlock"}}
    recipe = parse_recipe(data)
    full = run_conversion(recipe, tmp_path / "full", ConvertOptions(device="cpu"))
    with monkeypatch.context() as m:
        _kill_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu"))
    resumed = run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu", resume=True))
    assert resumed["metric"] == full["metric"]
    a, b = load_file(str(tmp_path / "full" / "target.safetensors")), load_file(str(tmp_path / "killed" / "target.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_run_killed_between_baselines_resumes_without_redoing_the_finished_one(tmp_path, monkeypatch):
    """A conversion stopped during its second baseline run goes on from there: the first run's figures come from
    the checkpoint (not retrained), the second is redone, and the report equals an uninterrupted run's."""
    import theseus_cli.pipelines.baselines as baselines_module

    recipe = _recipe(baseline={"runs": ["scratch", "distill"]})
    full = run_conversion(recipe, tmp_path / "full", ConvertOptions(device="cpu", baseline=True))
    real = baselines_module.baseline_model

    def build_or_die(conv, from_guide):
        if built:
            raise KeyboardInterrupt  # the second baseline run is stopped as it starts
        built.append(1)
        return real(conv, from_guide)

    built = []
    with monkeypatch.context() as m:
        m.setattr(baselines_module, "baseline_model", build_or_die)
        with pytest.raises(KeyboardInterrupt):
            run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu", baseline=True))
    assert not (tmp_path / "killed" / "report.json").exists()
    assert (tmp_path / "killed" / ".resume" / "baselines.pt").is_file()

    trained = []
    monkeypatch.setattr(baselines_module, "baseline_model", lambda conv, from_guide: trained.append(1) or real(conv, from_guide))
    resumed = run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu", baseline=True, resume=True))
    assert len(trained) == 1  # only the distillation run was trained again
    strip = lambda runs: {r: {k: v for k, v in d.items() if k != "seconds"} for r, d in runs.items()}  # noqa: E731
    assert strip(resumed["baselines"]) == strip(full["baselines"])
    assert resumed["metric"] == full["metric"]
    assert not (tmp_path / "killed" / ".resume").exists()


def test_a_resumed_report_adds_up_every_leg_and_says_it_was_resumed(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _kill_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_conversion(_recipe(), tmp_path / "o", ConvertOptions(device="cpu"))
    legs, align = __import__("theseus_cli.training.resume", fromlist=["load_legs"]).load_legs(tmp_path / "o")
    assert len(legs) == 1 and legs[0] > 0 and 0 < align <= legs[0]  # the killed leg, up to its stage checkpoint
    resumed = run_conversion(_recipe(), tmp_path / "o", ConvertOptions(device="cpu", resume=True))
    wall = resumed["wall_time"]
    assert wall["resumed"] is True and len(wall["legs"]) == 2 and wall["legs"][0] == pytest.approx(legs[0])
    assert wall["total"] == pytest.approx(sum(wall["legs"])) and wall["alignment"] > align  # stage 1's time counted
    fresh = run_conversion(_recipe(), tmp_path / "p", ConvertOptions(device="cpu"))["wall_time"]
    assert fresh["resumed"] is False and len(fresh["legs"]) == 1


def test_resume_with_the_guide_argument_forgotten_says_which_differs_through_the_cli(tmp_path, monkeypatch):
    from safetensors.torch import save_model
    from typer.testing import CliRunner
    import yaml

    from theseus_cli.cli.app import app
    from theseus_cli.models.build import build_model

    raw = tiny_recipe_dict(guide={"kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}},
                           align={"epochs": 2, "max_steps_per_epoch": 3})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    guide = tmp_path / "guide.safetensors"
    save_model(build_model(raw["guide"]["arch"], raw["guide"]["kwargs"], 0, "classification"), str(guide))
    with monkeypatch.context() as m:
        _kill_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_conversion(parse_recipe(raw), tmp_path / "o", ConvertOptions(checkpoint=guide, device="cpu"))
    res = CliRunner().invoke(app, ["convert", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"),
                                   "--resume", "--device", "cpu", "--quiet"])
    assert res.exit_code == 8, res.output
    assert f"made from the guide checkpoint {guide}" in res.output and "this command gives no guide checkpoint" in res.output
    assert "different recipe" not in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["convert", str(guide), "--recipe", str(tmp_path / "r.yaml"), "--out",
                                   str(tmp_path / "o"), "--resume", "--device", "cpu", "--quiet", "--json",
                                   "--no-latency"])
    assert res.exit_code == 0, res.output
    wall = json.loads(res.stdout)["wall_time"]  # the resumed run's report says so, and counts both legs
    assert wall["resumed"] is True and len(wall["legs"]) == 2 and wall["total"] == pytest.approx(sum(wall["legs"]))
