"""Second hardening pass through the real CLI: markup-safe errors, relative hf: directories, export opsets, sizes,
non-finite inputs, duplicate keys, alias bombs, slow patterns, sniffed checkpoints and files that are not files."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.errors import MatchError
from theseus_cli.surgery.matching import resolve_matches
from theseus_cli.config.recipe import RuleConfig
from theseus_cli.models.zoo import cnn_small
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def _invoke(args: list[str]):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output
    return res, res.output.strip()


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ markup-safe messages


def test_brackets_in_paths_and_patterns_are_printed_not_parsed(tmp_path):
    recipe = _write(tmp_path / "runs[/old]" / "r.yaml", tiny_recipe_dict(typo_key=1))
    res, line = _invoke(["inspect", "--recipe", recipe])
    assert res.exit_code == 3 and "runs[/old]/r.yaml" in line and "\n" not in line
    recipe = _write(tmp_path / "p.yaml", tiny_recipe_dict(
        replace=[{"match": "re:[a-z]+conv", "with": "lowrank_linear", "params": {"rank": 4}}]))
    res, line = _invoke(["inspect", "--recipe", recipe])
    assert res.exit_code == 5 and "'re:[a-z]+conv'" in line


def test_an_error_line_is_cut_keeping_the_start_and_the_count(tmp_path):
    data = tiny_recipe_dict()
    data["data"].update({f"junk_{i}": i for i in range(5000)})
    res, line = _invoke(["inspect", "--recipe", _write(tmp_path / "r.yaml", data)])
    assert res.exit_code == 3 and "\n" not in line and len(line) < 2200
    assert "5,000 problems" in line and "… and 4,992 more" in line


# ------------------------------------------------------------------ recipe files


def test_duplicate_keys_are_an_error_with_both_lines(tmp_path):
    text = yaml.safe_dump(tiny_recipe_dict()) + "seed: 3\n"  # `seed: 0` is already there
    res, line = _invoke(["inspect", "--recipe", _write(tmp_path / "r.yaml", text)])
    assert res.exit_code == 3 and "duplicate key 'seed' (first given at line" in line


def test_alias_bombs_and_deep_nesting_are_refused_quickly(tmp_path):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    res, line = _invoke(["inspect", "--recipe", _write(tmp_path / "bomb.yaml", bomb)])
    assert res.exit_code == 3 and "expands to more than 100,000 values" in line
    res, line = _invoke(["inspect", "--recipe", _write(tmp_path / "deep.yaml", "[" * 100_000 + "]" * 100_000)])
    assert res.exit_code == 3 and "nested too deeply" in line


def test_a_relative_hf_directory_works_with_a_relative_recipe_path(tmp_path, monkeypatch):
    from theseus_cli.models.build import build_model

    build_model("hf:gpt2", {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50257, "n_positions": 64}, 0,
                "causal-lm").save_pretrained(tmp_path / "model")
    (tmp_path / "c.txt").write_text("In the beginning God created the heaven and the earth.\n" * 40)
    _write(tmp_path / "r.yaml", tiny_recipe_dict(
        task="causal-lm", guide={"arch": "hf:./model", "kwargs": {}},
        data={"source": "text", "path": "c.txt", "sequence_length": 16, "train_limit": None, "test_limit": None},
        replace=[{"match": "GPT2Attention", "with": "token_mlp"}]))
    monkeypatch.chdir(tmp_path)
    res, line = _invoke(["inspect", "--recipe", "r.yaml", "--json"])
    assert res.exit_code == 0, line
    assert json.loads(res.stdout)["guide"]["arch"] == f"hf:{tmp_path / 'model'}"


def test_a_seed_out_of_range_is_a_recipe_error(tmp_path):
    res, line = _invoke(["inspect", "--recipe", _write(tmp_path / "r.yaml", tiny_recipe_dict(seed=10**30))])
    assert res.exit_code == 3 and "seed: Input should be less than or equal to 2147483647" in line


# ------------------------------------------------------------------ sizes that cannot fit


def test_a_target_too_large_for_the_device_is_refused_at_plan_time(tmp_path):
    recipe = _write(tmp_path / "r.yaml", tiny_recipe_dict(
        replace=[{"match": "Conv2d", "with": "lowrank_linear", "params": {"rank": 1_000_000_000}}]))
    started = time.monotonic()
    res, line = _invoke(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--device", "cpu"])
    assert res.exit_code == 7 and "the target (the largest replacement: module" in line
    assert "needs at least" in line and "available" in line and not (tmp_path / "run").exists()
    assert time.monotonic() - started < 600  # refused before any allocation, never by the allocator (a hang guard)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """One finished run of the tiny recipe, shared by the tests that only read it."""
    from tests.conftest import cli_conversion

    return cli_conversion(tmp_path_factory.mktemp("converted"), tiny_recipe_dict())[2]


def test_an_evaluation_batch_too_large_for_the_device_is_refused(converted):
    res, line = _invoke(["eval", converted, "--device", "cpu", "--batch", "100000000"])
    assert res.exit_code == 7 and line.startswith("error: --batch: a forward on a batch of 100,000,000")


def _npz(path: Path, n_classes: int, nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((120, 8, 8)).astype(np.float32)
    if nan:
        x[17, 3, 3] = np.nan
    y = np.arange(120) % n_classes
    np.savez(path, x=x, y=y)
    return path


def _npz_recipe(tmp_path: Path, data: Path) -> Path:
    return _write(tmp_path / "r.yaml", tiny_recipe_dict(data={"source": "npz", "path": str(data), "train_limit": None,
                                                               "test_limit": None, "batch_size": 32}))


def test_data_with_more_classes_than_the_guide_is_refused_before_alignment(tmp_path):
    recipe = _npz_recipe(tmp_path, _npz(tmp_path / "d.npz", 12))
    res, line = _invoke(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--device", "cpu"])
    assert res.exit_code == 6 and "data: 12 classes, but the guide outputs 10 logits per example" in line
    assert not (tmp_path / "run").exists()


def test_non_finite_data_and_weights_are_named_before_any_work(tmp_path):
    recipe = _npz_recipe(tmp_path, _npz(tmp_path / "d.npz", 10, nan=True))
    res, line = _invoke(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--device", "cpu"])
    assert res.exit_code == 6 and "non-finite values (NaN or Inf) in 1 of 120 images of x, the first at index 17" in line
    state = cnn_small(num_classes=10, in_chans=1, width=4).state_dict()
    state["0.weight"][0, 0, 0, 0] = float("inf")
    save_file(state, str(tmp_path / "g.safetensors"))
    recipe = _write(tmp_path / "ok.yaml", tiny_recipe_dict())
    res, line = _invoke(["convert", tmp_path / "g.safetensors", "--recipe", recipe, "--out", tmp_path / "run2"])
    assert res.exit_code == 4 and "non-finite weights (NaN or Inf) in 0.weight (1 of" in line


def test_a_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            Image.new("L", (64, 64)).save(tmp_path / "img" / split / cls / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64×64 image is then a "bomb": the same code path
    recipe = _write(tmp_path / "r.yaml", tiny_recipe_dict(data={"source": "imagefolder", "path": str(tmp_path / "img"),
                                                                "train_limit": None, "test_limit": None}))
    res, line = _invoke(["inspect", "--recipe", recipe])
    assert res.exit_code == 6 and "0.png: refused to decode" in line and "decompression bomb" in line


# ------------------------------------------------------------------ checkpoints: content, not names


def test_checkpoints_are_read_by_content_and_non_files_say_what_they_are(tmp_path):
    state = cnn_small(num_classes=10, in_chans=1, width=4).state_dict()
    recipe = _write(tmp_path / "r.yaml", tiny_recipe_dict())
    save_file(state, str(tmp_path / "really_safetensors.pt"))
    torch.save(state, tmp_path / "really_torch.safetensors")
    for name in ("really_safetensors.pt", "really_torch.safetensors"):
        res, line = _invoke(["inspect", tmp_path / name, "--recipe", recipe, "--json"])
        assert res.exit_code == 0, line
    (tmp_path / "text.pt").write_text("hello")
    os.mkfifo(tmp_path / "pipe.pt")
    (tmp_path / "folder.pt").mkdir()
    for path, what in ((tmp_path / "text.pt", "neither safetensors nor a PyTorch file"),
                       (tmp_path / "pipe.pt", "is a named pipe (FIFO), not a checkpoint file"),
                       (tmp_path / "folder.pt", "is a directory, not a checkpoint file"),
                       (Path("/dev/zero"), "is a character device, not a checkpoint file")):
        res, line = _invoke(["inspect", path, "--recipe", recipe])
        assert res.exit_code == 4 and what in line, line


# ------------------------------------------------------------------ patterns that backtrack


def test_a_catastrophically_backtracking_pattern_is_stopped(tmp_path):
    model = nn.Sequential()
    model.add_module("a" * 60 + "b", nn.Linear(2, 2))  # Python's re takes hours on this (28 s at 40 a's)
    started = time.monotonic()
    with pytest.raises(MatchError, match=r"took over 1 s to match the module path 'a+b' \(catastrophic backtracking"):
        resolve_matches(model, [RuleConfig.model_validate({"match": "re:(a|aa)+", "with": "lowrank_linear"})])
    assert time.monotonic() - started < 600  # the bound holds (a hang guard only)


# ------------------------------------------------------------------ export opsets


@pytest.mark.parametrize("opset", [17, 18])
def test_export_writes_the_opset_asked_for(converted, tmp_path, opset):
    import onnx

    res, line = _invoke(["export", converted, "--opset", opset, "--out", tmp_path / "t.onnx", "--json"])
    assert res.exit_code == 0, line
    result = json.loads(res.stdout)
    model = onnx.load(result["out"])
    declared = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert declared == opset and result["opset"] == opset
