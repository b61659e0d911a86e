"""``theseus search`` through the real CLI: a whole search, inspect of a search file, kill and --resume, two
workers on one study, and each bad input its one line and exit code."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from tests.conftest import HANG_S, tiny_recipe_dict

SPACE = {"rules": [{"match": "3", "with": ["keep", "separable_conv", {"with": "lowrank_conv",
                                                                       "params": {"rank_ratio": 0.5}}]}],
         "methods": ["not", "distill"]}
# the guide (446 parameters) misses max_params, so a conversion wins; the latency goal holds for every candidate
SEARCH = {"base": "base.yaml", "space": SPACE, "goals": {"max_latency_ratio": 100.0, "max_params": 400,
                                                           "runtime": {"exporter": "torchscript"}},
          "budget": {"min_fraction": 0.5, "reduction_factor": 2, "max_cost": 10}, "validation": {"size": 40}}
GUIDE = Path(__file__).resolve().parents[2] / ".cache" / "tests" / "search-guide.safetensors"


def trained_guide() -> Path:
    """The tiny guide trained once (4 epochs on the digits), kept between test runs like the token caches."""
    if not GUIDE.is_file():
        GUIDE.parent.mkdir(parents=True, exist_ok=True)
        recipe = GUIDE.parent / "search-guide.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe_dict()))
        tmp = GUIDE.with_name(f".{GUIDE.name}.{os.getpid()}.safetensors")
        res = CliRunner().invoke(app, ["train-guide", "--recipe", str(recipe), "--out", str(tmp), "--epochs", "4",
                                       "--quiet"])
        assert res.exit_code == 0, res.output
        os.replace(tmp, GUIDE)  # both test workers may train it; either file is whole
    return GUIDE


def write_search(tmp: Path, **changes) -> Path:
    base = tiny_recipe_dict(finetune={"epochs": 2}, guide={"checkpoint": str(trained_guide())})
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    search = {**SEARCH, **changes}
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, ["search", *args, "--device", "cpu"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    path = write_search(tmp)
    res = cli("--recipe", str(path), "--out", str(tmp / "out"), "--json")
    assert res.exit_code == 0, res.output[-3000:]
    return tmp, path, json.loads(res.stdout)


def test_a_search_writes_its_result_the_front_and_the_winner_as_a_run(finished):
    tmp, _, result = finished
    out = tmp / "out"
    assert result == json.loads((out / "search.json").read_text()) and result["state"] == "finished"
    assert (out / "pareto.png").stat().st_size > 1000
    assert result["phase1"]["architectures"] == 2 and result["candidates"] == 4
    labels = [t["candidate"] for t in result["trials"]]
    assert len(labels) == len(set(labels)) == 4  # every candidate once
    for t in result["trials"]:
        assert t["architecture"] and t["method"] in ("not", "distill") and t["rungs"][0]["fraction"] == 0.5
    best = out / "best"
    assert {"target.safetensors", "report.json", "target.onnx"} <= {p.name for p in best.iterdir()}
    report = json.loads((best / "report.json").read_text())
    section = report["search"]
    assert section["winner"] == result["winner"]["label"] and section["gates"]["passed"]
    assert section["test"]["metric"] == "accuracy" and 0 <= section["test"]["target"] <= 1
    assert section["final"]["file"] == "target.onnx" and section["final"]["latency_ms"] > 0
    assert result["cost"]["nominal"] <= 10 and result["cost"]["reached_full_budget"] >= 1
    assert {e["label"] for e in result["pool"]} >= {"guide fp32", "guide int8"}


def test_the_winner_is_the_fastest_within_one_standard_error_of_the_best_that_meets_the_goals(finished):
    _, _, result = finished
    feasible = [e for e in result["pool"] if e["feasible"]]
    best = max(e["validation_metric"] for e in feasible)
    choice = result["choice"]
    assert choice["rule"] == "one-se" and choice["best_validation"] == best
    near = [e for e in feasible if e["validation_metric"] >= best - choice["standard_error"]]
    assert sorted(choice["within_one_se"]) == sorted(e["label"] for e in near)
    assert result["winner"]["label"] == min(near, key=lambda e: e["ratio_to_guide"]["median"])["label"]
    full = [t for t in result["trials"] if t["full_budget"]]
    assert all(t["state"] == "complete" for t in full)
    assert result["pareto_front"] and result["winner"]["label"] in {e["label"] for e in result["pool"]}


def test_every_candidate_runs_the_first_rung_before_any_is_promoted_and_the_cost_cap_holds(tmp_path):
    path = write_search(tmp_path, space={**SPACE, "methods": ["not", "progressive-distill", "distill"]},
                        budget={"min_fraction": 0.5, "reduction_factor": 2, "max_cost": 2.5})
    res = cli("--recipe", str(path), "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output[-3000:]
    result = json.loads(res.stdout)
    rungs = [line for line in res.stderr.splitlines() if line.startswith("trial: ")]
    first = [i for i, line in enumerate(rungs) if "rung 1/2" in line]
    second = [i for i, line in enumerate(rungs) if "rung 2/2" in line]
    assert first and second and max(first) < min(second)  # synchronous: no head start for the first trials
    cost = result["cost"]
    assert cost["gradient_steps"] <= 2.5 * cost["full_conversion_steps"] and cost["full_conversion_equivalents"] <= 2.5
    assert cost["reached_full_budget"] >= 1  # the reserve kept the winner's full rung affordable
    stopped = [t["stopped"] or "" for t in result["trials"]]
    assert cost["not_run_cost_cap"] == stopped.count("cost cap: not run") >= 1
    assert len(result["trials"]) == result["candidates"] == 6


@pytest.mark.parametrize("sampler,pruner", [("tpe", "successive-halving"), ("grid", "hyperband")])
def test_optunas_own_samplers_and_hyperband_run_in_its_optimize_loop_under_the_cost_cap(tmp_path, sampler, pruner):
    budget = {"min_fraction": 0.5, "reduction_factor": 2, "max_cost": 3, "pruner": pruner,
              **({"trials": 3} if sampler == "tpe" else {})}
    path = write_search(tmp_path, sampler=sampler, budget=budget)
    res = cli("--recipe", str(path), "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output[-3000:]
    result = json.loads(res.stdout)
    assert result["state"] == "finished" and result["cost"]["full_conversion_equivalents"] <= 3
    assert len(result["trials"]) <= (3 if sampler == "tpe" else result["candidates"])
    assert "synchronous" not in res.stderr


def test_a_finished_search_resumed_runs_nothing(finished):
    tmp, path, result = finished
    res = cli("--recipe", str(path), "--out", str(tmp / "out"), "--resume", "--json")
    assert res.exit_code == 0, res.output[-2000:]
    assert json.loads(res.stdout)["wall_seconds"] == result["wall_seconds"]


def test_inspect_of_a_search_file_shows_the_space_and_phase_1_without_training(tmp_path):
    path = write_search(tmp_path)
    res = CliRunner().invoke(app, ["inspect", "--recipe", str(path), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    plan = json.loads(res.stdout)
    assert plan["kind"] == "search" and plan["space"]["architectures"] == 2 and plan["candidates"] == 4
    assert all(r["latency_ms"] > 0 and "feasible" in r for r in plan["phase1"]["architectures"])
    text = CliRunner().invoke(app, ["inspect", "--recipe", str(path)])
    assert text.exit_code == 0 and "phase 1" in text.stdout and "separable_conv" in text.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "search.yaml"]  # nothing written


@pytest.mark.parametrize("case,code,words", [
    ("empty", 3, "the space is empty"),
    ("fits-none", 5, "identity fits no module"),
    ("infeasible", 10, "no candidate meets the goals; nearest:"),
])
def test_a_bad_search_is_one_line_and_its_exit_code(tmp_path, case, code, words):
    changes = {"empty": {"space": {"rules": [{"match": "3", "with": ["keep"]}]}},
               "fits-none": {"space": {"rules": [{"match": "3", "with": ["keep", "identity"]}]}},
               "infeasible": {"goals": {"max_latency_ratio": 0.001, "runtime": {"exporter": "torchscript"}}}}[case]
    path = write_search(tmp_path, **changes)
    out = tmp_path / "out"
    res = cli("--recipe", str(path), "--out", str(out))
    assert res.exit_code == code, res.output[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and words in line and "Traceback" not in res.stderr
    if case == "infeasible":  # the record of what was measured is complete; no winner, no trial
        result = json.loads((out / "search.json").read_text())
        assert result["state"] == "no feasible candidate" and not (out / "best").exists() and not result["trials"]
    else:
        assert not out.exists()


def test_a_goal_on_a_runtime_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    res = cli("--recipe", str(write_search(tmp_path)), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and "onnxruntime is not installed" in res.stderr and not (tmp_path / "out").exists()


def test_resume_of_another_study_is_refused_and_leaves_it_whole(finished, tmp_path):
    tmp, _, result = finished
    other = write_search(tmp_path, goals={"max_latency_ratio": 50.0, "runtime": {"exporter": "torchscript"}})
    before = (tmp / "out" / "search.json").read_bytes()
    res = cli("--recipe", str(other), "--out", str(tmp / "out"), "--resume")
    assert res.exit_code == 8 and "holds another search" in res.stderr
    assert (tmp / "out" / "search.json").read_bytes() == before


# ------------------------------------------------------------------ real processes: a kill, two workers

def _cmd(path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "theseus_cli", "search", "--recipe", str(path), "--out", str(out), "--device", "cpu",
            "--json", *extra]


def _env():
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}


def _finished_rungs(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/r*/report.json")} if out.is_dir() else {}


ONE_RUNG = {"min_fraction": 1.0, "max_cost": 10}  # the process tests: one conversion per trial, the least work


def test_a_killed_search_resumes_and_runs_no_finished_trial_again(tmp_path):
    path = write_search(tmp_path, budget=ONE_RUNG)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(path, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S  # progress (a finished rung) decides when to kill, not a clock
    while len(_finished_rungs(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: the running trial stays RUNNING in the study
    proc.communicate(timeout=HANG_S)
    done = _finished_rungs(out)
    assert done and not (out / "search.json").exists()
    res = subprocess.run(_cmd(path, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed" in res.stderr
    assert all(p.stat().st_mtime_ns == m for p, m in done.items())  # a finished rung is never run again
    result = json.loads(res.stdout)
    kept = [t["candidate"] for t in result["trials"] if t["state"] in ("complete", "pruned")]
    assert sorted(kept) == sorted(set(kept)) and len(kept) == 4
    assert all(t["state"] != "running" for t in result["trials"])


def test_two_workers_share_one_study_and_never_run_a_candidate_twice(tmp_path):
    path = write_search(tmp_path, space={**SPACE, "methods": ["not", "progressive-distill", "distill"]}, budget=ONE_RUNG)
    out, storage = tmp_path / "out", f"journal:{tmp_path / 'study.log'}"
    procs = [subprocess.Popen(_cmd(path, out, "--storage", storage), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=HANG_S) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outputs]
    result = json.loads((out / "search.json").read_text())
    labels = [t["candidate"] for t in result["trials"]]
    assert len(labels) == len(set(labels)) == result["candidates"] == 6
    workers = {t["worker"] for t in result["trials"]}
    assert len(workers) == 2, workers  # both processes ran trials of the one study
    assert sum(bool(o.strip()) for o, _ in outputs) >= 1  # the last to finish printed the result


def test_on_a_terminal_finished_trials_fill_a_live_table():
    import io

    from rich.console import Console

    from theseus_cli.cli.search_view import TrialTable

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    table = TrialTable(console)
    table.log("phase 1: [timing]")  # user-derived text is printed as it is, never parsed as markup
    for n in range(3):
        table.on_trial({"number": n, "state": "complete", "candidate": f"layer{n}:separable_conv [x]",
                        "budget_fraction": 1.0, "validation_metric": 0.5 + n / 10})
    table.close()
    text = console.file.getvalue()
    assert "phase 1: [timing]" in text and "layer2:separable_conv [x]" in text and "0.7000" in text


def test_the_base_recipe_as_written_is_never_pruned_and_competes_at_the_full_budget(tmp_path):
    base = tiny_recipe_dict(finetune={"epochs": 2}, guide={"checkpoint": str(trained_guide())},
                            replace=[{"match": "3", "with": "separable_conv"}])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(SEARCH))
    res = cli("--recipe", str(path), "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output[-3000:]
    result = json.loads(res.stdout)
    assert result["incumbent"] == "all:separable_conv | not"
    trials = {t["candidate"]: t for t in result["trials"]}
    assert trials[result["incumbent"]]["incumbent"] and trials[result["incumbent"]]["full_budget"]
    others = [t for t in result["trials"] if not t["incumbent"]]
    at_rung0 = sorted((t["rungs"][0]["metric"] for t in others), reverse=True)
    promoted = [t for t in others if t["full_budget"]]
    # the other three compete for max(1, 3 // 2) = 1 place (all tied at the top are kept), the incumbent takes none
    assert len(promoted) == sum(v == at_rung0[0] for v in at_rung0) >= 1
    assert all(t["rungs"][0]["metric"] == at_rung0[0] for t in promoted)


def test_the_incumbent_is_the_base_recipes_own_method():
    from theseus_cli.config.recipe import parse_recipe
    from theseus_cli.pipelines.search.incumbent import base_method

    assert base_method(parse_recipe(tiny_recipe_dict())) == ("not", "cka")
    assert base_method(parse_recipe(tiny_recipe_dict(finetune={"distill": {}}, similarity={"kind": "mse"}))) == \
        ("not-teacher", "mse")
    assert base_method(parse_recipe(tiny_recipe_dict(schedule={"objective": "distill"})))[0] == "progressive-distill"
    assert base_method(parse_recipe(tiny_recipe_dict(align={"epochs": 0}))) is None  # no method of a space runs it
