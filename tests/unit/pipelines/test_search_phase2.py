"""Phase 2's parts on their own: the planned steps against a real conversion's, the cost ledger, the synchronous
rung pruner, the labelled validation split of a few-label recipe, and the one-standard-error choice of the winner."""

import math
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.config.search import Goals, SearchConfig
from theseus_cli.pipelines.convert import ConvertOptions, run_conversion
from theseus_cli.pipelines.search.cost import fits, planned_steps, spent_steps
from theseus_cli.pipelines.search.finish import Finish
from theseus_cli.pipelines.search.study import RungPruner
from theseus_cli.pipelines.search.validation import carve_validation
from theseus_cli.surgery.plan import build_plan
from theseus_cli.training.session import open_session
from tests.conftest import tiny_recipe_dict


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
@pytest.mark.parametrize("changes", [{}, {"align": {"epochs": 2, "max_steps_per_epoch": 2}, "finetune": {"epochs": 2}},
                                     {"align": {"epochs": 0}}])
def test_planned_steps_are_the_steps_a_conversion_runs(tmp_path, changes):
    raw = tiny_recipe_dict(data={"label_limit": 150}, replace=[{"match": "Conv2d", "with": "separable_conv"}])
    for key, value in changes.items():
        raw[key] = {**raw[key], **value}
    recipe = parse_recipe(raw)
    session = open_session(recipe, None, "cpu")
    stages = len(build_plan(session.guide, recipe, session.data.x_train[:2]).stages)
    planned = planned_steps(recipe, stages, int(session.data.x_train.shape[0]), int(session.data.labelled.numel()),
                            session.device)
    report = run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False), session=session)
    assert planned == report["steps"]["alignment"] + report["steps"]["finetune"] > 0


def test_a_rung_directory_is_charged_once_however_often_it_is_resumed():
    first = [{"candidate_key": "a", "fraction": 0.25, "steps": 10}, {"candidate_key": "a", "fraction": 1.0, "steps": 40}]
    retry = [{"candidate_key": "a", "fraction": 0.25, "steps": 10}]  # the same directory, resumed
    other = [{"candidate_key": "b", "fraction": 0.25, "steps": 12}]
    assert spent_steps([first, retry, other]) == 62
    assert fits(50, 10, 100, reserve=40) and not fits(51, 10, 100, reserve=40)


def _study_with(values: list[float], failed: list[float] = ()) -> tuple[optuna.Study, list[optuna.Trial]]:
    study = optuna.create_study(direction="maximize", pruner=RungPruner(4, higher_is_better=True))
    trials = []
    for v in values:
        trial = study.ask()
        trial.report(v, 1)
        trials.append(trial)
    for v in failed:
        trial = study.ask()
        trial.report(v, 1)
        study.tell(trial, state=TrialState.FAIL)
    return study, trials


def test_the_rung_pruner_keeps_the_best_quarter_of_every_value_at_the_rung_whatever_the_order():
    values = [0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6]
    study, trials = _study_with(values, failed=[0.99])  # a failed trial's value does not compete
    kept = [v for v, t in zip(values, trials) if not t.should_prune()]
    assert sorted(kept) == [0.8, 0.9]  # 8 // 4 = 2, the first asked (0.5) included: no head start
    study, trials = _study_with([0.4, 0.4, 0.4])
    assert not any(t.should_prune() for t in trials)  # fewer than η: the best one, ties all kept
    lower = optuna.create_study(direction="minimize", pruner=RungPruner(2, higher_is_better=False))
    asked = [lower.ask() for _ in range(4)]
    for t, v in zip(asked, [3.0, 1.0, 4.0, 2.0]):
        t.report(v, 1)
    assert [not t.should_prune() for t in asked] == [False, True, False, True]


def test_a_few_label_recipe_ranks_on_a_fifth_of_its_labels_when_they_are_enough():
    session = open_session(parse_recipe(tiny_recipe_dict(data={"label_limit": 500, "train_limit": 1200})), None, "cpu")
    trial, info = carve_validation(session, 1000, "auto", 0)
    assert info["rank_by"] == "labels" and info["from"] == "labelled training inputs" and info["size"] == 100
    assert info["labelled_left"] == 400 and trial.data.x_train.shape[0] == 1100
    held = trial.data.x_test
    originals = session.data.x_train[session.data.labelled]  # every held-out input was a labelled one
    assert all(any(torch.equal(h, o) for o in originals) for h in held[:10])
    assert trial.data.y_test.shape == (100,)  # scored on their own labels, not on the guide's classes
    few = open_session(parse_recipe(tiny_recipe_dict(data={"label_limit": 100})), None, "cpu")
    assert carve_validation(few, 50, "auto", 0)[1]["rank_by"] == "guide-agreement"  # 20 labels are too few


def _finish(choose: str, n: int, task: str = "classification") -> Finish:
    search = SimpleNamespace(base=SimpleNamespace(task=task), validation={"size": n},
                             search=SimpleNamespace(goals=Goals(), validation=SimpleNamespace(choose=choose)))
    return Finish(search, [])


def _entry(label: str, metric: float, ratio: float) -> dict:
    return {"label": label, "validation_metric": metric, "ratio_to_guide": {"median": ratio}, "latency_ms": ratio}


def test_the_winner_is_the_fastest_within_one_standard_error_of_the_best():
    pool = [_entry("best", 0.80, 0.45), _entry("close", 0.78, 0.15), _entry("far", 0.70, 0.05)]
    winner, choice = _finish("one-se", 200).choose(pool)
    se = math.sqrt(0.8 * 0.2 / 200)  # 0.028: 0.78 is within it, 0.70 is not
    assert winner["label"] == "close" and choice["standard_error"] == pytest.approx(se, rel=1e-12)
    assert choice["within_one_se"] == ["best", "close"] and choice["best"] == "best"
    assert _finish("one-se", 20_000).choose(pool)[0]["label"] == "best"  # a large split tells them apart
    assert _finish("best", 200).choose(pool)[0]["label"] == "best"
    sentences = [_entry("best", 0.95, 0.45), _entry("close", 0.949, 0.15)]
    assert _finish("one-se", 200, "sentence-embedding").choose(sentences)[0]["label"] == "best"  # not a share


def test_the_one_se_rule_is_the_default_and_can_be_turned_off():
    search = SearchConfig.model_validate({"base": "b.yaml", "space": {"rules": [{"match": "x", "with": ["keep"]}]}})
    assert search.validation.choose == "one-se"
    assert "choose" not in search.model_dump(mode="json", exclude_defaults=True).get("validation", {})


@pytest.mark.parametrize("guide_accuracy,rank_by,warned", [(1.0, "labels", True), (0.9, "labels", False),
                                                           (1.0, "guide-agreement", False)])
def test_a_guide_perfect_on_the_validation_labels_is_said_to_have_seen_them(guide_accuracy, rank_by, warned):
    logged = []
    search = SimpleNamespace(base=SimpleNamespace(task="classification"), validation={"size": 200, "rank_by": rank_by},
                             search=SimpleNamespace(goals=Goals(), validation=SimpleNamespace(choose="one-se")),
                             warnings=[], progress=SimpleNamespace(log=logged.append))
    Finish(search, []).warn_if_guide_saw_validation(guide_accuracy)
    assert bool(search.warnings) == warned and len(logged) == int(warned)
    if warned:
        assert "most likely trained on these labelled inputs" in search.warnings[0]


def test_train_guide_on_a_search_file_leaves_out_exactly_the_labels_the_search_ranks_on(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from theseus_cli.cli.app import app
    from theseus_cli.config.search import load_search
    from theseus_cli.data.dataset import load_dataset
    from theseus_cli.pipelines.search.validation import held_out

    base = tiny_recipe_dict(data={"label_limit": 500, "train_limit": 1200})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    search_file = tmp_path / "search.yaml"
    search_file.write_text(yaml.safe_dump({"base": "base.yaml", "validation": {"size": 1000},
                                           "space": {"rules": [{"match": "Conv2d", "with": ["keep", "separable_conv"]}]}}))
    res = CliRunner().invoke(app, ["train-guide", "--recipe", str(search_file), "--out", str(tmp_path / "g.safetensors"),
                                   "--epochs", "1", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["held_out"] == {"size": 100, "from": "labelled training inputs", "rank_by": "labels",
                                  "labelled_left": 400}
    search, recipe = load_search(search_file)
    data = load_dataset(recipe.data, recipe.seed, recipe.task, recipe.guide.arch)
    held = held_out(data, recipe.task, search.validation.size, search.validation.rank_by, recipe.seed).indices
    session = open_session(recipe, tmp_path / "g.safetensors", "cpu")
    trial, _ = carve_validation(session, search.validation.size, search.validation.rank_by, recipe.seed)
    assert torch.equal(trial.data.x_test, data.x_train[held])  # the search holds out the very inputs the guide skipped
    plain = CliRunner().invoke(app, ["train-guide", "--recipe", str(tmp_path / "base.yaml"), "--out",
                                     str(tmp_path / "p.safetensors"), "--epochs", "1", "--json", "--quiet"])
    assert plain.exit_code == 0 and json.loads(plain.output)["held_out"] is None


def test_phase_1_keeps_an_architecture_only_within_the_goal_less_its_margin():
    from theseus_cli.pipelines.search.screen import goal_problems

    record = {"latency_ms": 0.9, "params": 10, "file_bytes": 10, "ratio_to_guide": {"median": 0.46}}
    assert goal_problems(record, Goals(max_latency_ratio=0.5, latency_margin=0.0)) == []
    said = goal_problems(record, Goals(max_latency_ratio=0.5))  # the default margin, 15 %: ×0.425 at most
    assert len(said) == 1 and "×0.425" in said[0] and "margin" in said[0]
    assert goal_problems(record, Goals(max_latency_ms=1.0, latency_margin=0.05)) == []
    assert len(goal_problems(record, Goals(max_latency_ms=1.0, latency_margin=0.2))) == 1


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_start_fresh_draws_every_weight_anew_and_the_distill_method_asks_for_it(tmp_path):
    from safetensors.torch import load_file

    from theseus_cli.pipelines.search.methods import METHODS, MethodContext

    raw = tiny_recipe_dict(replace=[{"match": "Conv2d", "with": "separable_conv"}], align={"epochs": 0},
                           finetune={"epochs": 0}, bn_recalibration={"enabled": False})
    kept = {}
    for start in ("guide", "fresh"):
        recipe = parse_recipe({**raw, "start": start})
        session = open_session(recipe, None, "cpu")
        guide = {k: v.detach().clone() for k, v in session.guide.state_dict().items()}
        run_conversion(recipe, tmp_path / start, ConvertOptions(device="cpu", latency=False), session=session)
        target = load_file(str(tmp_path / start / "target.safetensors"))
        heads = [k for k in target if k in guide and k.endswith("weight") and target[k].shape == guide[k].shape
                 and target[k].dim() == 2]  # the kept linear layers
        assert heads
        kept[start] = [torch.equal(target[k], guide[k]) for k in heads]
    assert all(kept["guide"]) and not any(kept["fresh"])
    ctx = MethodContext(None, align_steps=12, finetune_steps_per_epoch=4)
    for method, start, teacher in (("distill", "fresh", True), ("guide-init-distill", "guide", True),
                                   ("scratch", "fresh", False)):
        data = parse_recipe(raw).resolved()
        METHODS.lookup(method).rewrite(data, ctx)
        assert data["start"] == start and (data["finetune"]["distill"] is not None) == teacher
        assert data["align"]["epochs"] == 0 and data["finetune"]["epochs"] == 3  # 12 alignment steps, 4 a epoch
    with pytest.raises(Exception, match="start: fresh applies to replace recipes"):
        parse_recipe({**{k: v for k, v in raw.items() if k != "replace"}, "start": "fresh",
                      "similarity": {"kind": "cka"},
                      "target": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1},
                                 "blocks": {"guide": "re:features\\.\\d+", "target": "re:features\\.\\d+"}}})
