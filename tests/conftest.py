"""Shared helpers: tiny seeded recipes on real (small) data."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import torch
import yaml

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two workers on two cores: one intra-op thread each (subprocesses inherit it through the
    # environment), or the workers oversubscribe the CPU and every test runs several times slower
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# latency figures in tests are only checked against generous thresholds: time each (model, batch) briefly (README,
# "Deploying"); subprocesses inherit it
os.environ.setdefault("THESEUS_LATENCY_BUDGET_S", "0.02")
# the CLI honours $COLUMNS when its output is piped; pytest-xdist's workers get COLUMNS=80 from execnet, so the same
# test would see another width with -n 2 than without: tests that check a width set COLUMNS themselves
os.environ.pop("COLUMNS", None)

REPO = Path(__file__).resolve().parents[1]  # the repository root (tests live in tests/unit/<subpackage> and tests/e2e)

# tokenised corpora are kept between processes (theseus_cli.data.token_cache): in the repository's ignored .cache, not
# the user's home, shared by both workers and every subprocess; entries are named by the corpus, the tokenizer and the
# call, so a changed input is a new entry, never a stale one
os.environ.setdefault("THESEUS_CACHE_DIR", str(REPO / ".cache" / "tests"))

TINY = {
    "guide": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}},
    "data": {"source": "digits", "train_limit": 400, "test_limit": 200, "batch_size": 64, "eval_batch_size": 256},
    "replace": [{"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 16}}],
    "align": {"epochs": 1, "max_steps_per_epoch": 3, "lr": 1e-3},
    "bn_recalibration": {"batches": 2},
    "finetune": {"epochs": 1, "lr": 1e-3, "warmup_epochs": 0.5},
    "seed": 0,
}


def tiny_recipe_dict(**sections) -> dict:
    data = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(data: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cli_conversion(tmp: Path, recipe: dict, guide_epochs: int | None = None, *args: str,
                   guide_lr: float | None = None) -> tuple[Path, Path | None, Path, dict]:
    """Through the real CLI: write ``recipe``, train its guide for ``guide_epochs`` (None: untrained guide; at
    ``guide_lr``, default train-guide's), convert into ``tmp/run`` with ``args``; returns (recipe file, guide
    checkpoint, run directory, report)."""
    import json

    from typer.testing import CliRunner

    from theseus_cli.cli.app import app

    runner = CliRunner()
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    guide = None
    if guide_epochs is not None:
        guide = tmp / "guide.safetensors"
        lr = ["--lr", str(guide_lr)] if guide_lr is not None else []
        res = runner.invoke(app, ["train-guide", "--recipe", str(path), "--out", str(guide), "--epochs", str(guide_epochs),
                                  *lr, "--json"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["convert", *([str(guide)] if guide else []), "--recipe", str(path), "--out", str(tmp / "run"),
                              "--device", "cpu", "--json", *args])
    assert res.exit_code == 0, res.output
    return path, guide, tmp / "run", json.loads(res.stdout)


# Subprocess time limits catch hangs only: a loaded 2-core machine may run any step many times slower than an idle
# one, so no test may fail because a healthy run was slow (progress, not the clock, decides when tests act).
HANG_S = 3600


# Tests that run for tens of seconds (smoke runs of examples and benchmarks, multi-process runs). They run first, so
# that the two workers of `make test` finish together instead of one waiting on the last (see below).
HEAVY = ("test_gpt2_to_rnn_example", "test_gpu_conversion_time_benchmark", "test_transformers_benchmark_runs_small",
         "test_minilm_attention_to_token_mlp", "test_transport_benchmark_runs_small", "test_two_gloo_processes",
         "test_killed_at_random_moments", "test_trust_checkpoint_reads_a_whole_pickled_module",
         "test_deployment_cost_benchmark", "test_a_pickle_that_would_run_code_is_refused",
         "test_gpu_throughput_benchmark", "test_deploy_onnx_example", "test_library_conversion_example",
         "test_stage_grouping_benchmark", "test_edge_benchmark_runs_small", "test_lowrank_start_benchmark",
         "test_distillation_benchmark", "test_linear_attention_gpt2_converts", "test_a_killed_search_resumes",
         "test_two_workers_share_one_study", "test_a_search_writes_its_result")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.name.startswith(HEAVY))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `pytest -p no:xdist` must still load this file
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s scheduler (``-n 2``): one test at a time to whichever worker is free, in collection order
    (heavy tests first), except that a module with a module-scoped fixture (a finished conversion, a trained GPT-2)
    goes to one worker whole, which builds the fixture once.

    xdist's default (``--dist load``) hands each worker a block of consecutive tests at first: a quarter of the
    suite, every heavy test on the first worker. Its ``--dist loadgroup`` cannot group here: xdist 3.8 tags a
    grouped test by setting ``item._nodeid``, which pytest 9.2 no longer reads."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the collection order: heavy tests first

    class FixtureModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if _has_module_fixture(module) else nodeid

    return FixtureModuleScheduling(config, log)


@functools.lru_cache(maxsize=None)
def _has_module_fixture(module: str) -> bool:
    path = REPO / module
    return path.suffix == ".py" and path.is_file() and 'scope="module"' in path.read_text(encoding="utf-8")
