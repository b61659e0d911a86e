"""Hostile files: nothing a checkpoint, recipe or model directory holds runs unless the user opts in."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from theseus_cli.models.build import build_model, read_state_dict, trusting_pickles
from theseus_cli.errors import ModelError
from theseus_cli.models.zoo import cnn_small
from tests.conftest import REPO, HANG_S, tiny_recipe_dict


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "theseus_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "CI": "true"}, timeout=HANG_S)


def test_a_pickle_that_would_run_code_is_refused_through_the_real_cli(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"0.weight": _Payload(marker)}, fh)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict()))
    for verb in (["inspect", "evil.pt", "--recipe", "r.yaml"],
                 ["convert", "evil.pt", "--recipe", "r.yaml", "--out", "o", "--device", "cpu"],
                 ["eval", "evil.pt", "--recipe", "r.yaml", "--device", "cpu"]):
        res = _cli(*verb, cwd=tmp_path)
        assert res.returncode == 4 and res.stdout == ""
        assert res.stderr.count("\n") == 1 and "refused to unpickle" in res.stderr and "--trust-checkpoint" in res.stderr
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "o" / "target.safetensors").exists()


def test_trust_checkpoint_reads_a_whole_pickled_module_and_nothing_else_does(tmp_path):
    model = cnn_small(num_classes=10, in_chans=1, width=4)
    torch.save(model, tmp_path / "whole.pt")  # a full nn.Module, not a state dict
    with pytest.raises(ModelError, match="refused to unpickle"):
        read_state_dict(tmp_path / "whole.pt")
    with trusting_pickles():
        state = read_state_dict(tmp_path / "whole.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ModelError):  # the opt-in does not outlive its block
        read_state_dict(tmp_path / "whole.pt")

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(finetune={"epochs": 0})))
    res = _cli("convert", "whole.pt", "--recipe", "r.yaml", "--out", "o", "--device", "cpu", "--trust-checkpoint",
               "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["guide"]["trained"] and report["guide"]["unpickled_in_full"] is True
    assert _cli("inspect", "whole.pt", "--recipe", "r.yaml", cwd=tmp_path).returncode == 4


def test_a_model_directory_with_remote_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil_model"
    folder.mkdir()
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8, "vocab_size": 50,
              "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    try:
        model = build_model(f"hf:{folder}", {}, 0, "causal-lm")
    except ModelError:
        model = None  # refusing is as good as ignoring the code
    assert not marker.exists()
    if model is not None:
        assert type(model).__name__ == "GPT2LMHeadModel"


def test_yaml_cannot_construct_python_objects(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("guide: !!python/object/apply:os.system ['touch pwned']\nreplace: []\n")
    res = _cli("inspect", "--recipe", "r.yaml", cwd=tmp_path)
    assert res.returncode == 3 and not (tmp_path / "pwned").exists()


def test_the_only_code_a_recipe_names_is_its_module_function_spec(tmp_path):
    """``module:function`` imports and calls what it names (documented); no other field imports anything."""
    (tmp_path / "mymodels.py").write_text("import torch.nn as nn\n"
                                          "def tiny(num_classes=10):\n"
                                          "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        model = build_model("mymodels:tiny", {"num_classes": 3}, 0)
    finally:
        sys.path.remove(str(tmp_path))
    assert model[1].out_features == 3
    with pytest.raises(ModelError, match="cannot import"):
        build_model("no_such_module_xyz:f", {}, 0)
    readme = (REPO / "README.md").read_text()
    assert "module:function" in readme and "--trust-checkpoint" in readme


def test_a_pkg_checkpoint_that_climbs_out_of_its_package_is_refused_through_the_real_cli(tmp_path):
    import email

    payload = tmp_path / "payload"
    payload.mkdir()
    model = cnn_small(num_classes=10, in_chans=1, width=4)
    torch.save(model.state_dict(), payload / "w.pt")
    climb = os.path.relpath(payload / "w.pt", os.path.dirname(email.__file__))
    recipe = tiny_recipe_dict()
    recipe["guide"]["checkpoint"] = f"pkg:email/{climb}"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = _cli("inspect", "--recipe", "r.yaml", cwd=tmp_path)
    assert res.returncode == 4 and res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1 and "leads outside the package 'email'" in res.stderr


def _inflating_checkpoint(path: Path, declared: int) -> None:
    """A real ``torch.save`` zip whose central directory declares its storage ``declared`` bytes long: what a small
    download that inflates past memory looks like to a reader that trusts the directory."""
    import zipfile

    small = path.with_suffix(".small")
    torch.save({"0.weight": torch.zeros(4)}, small)
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        storage = next(i for i in dst.infolist() if "/data/" in i.filename)
        storage.file_size = declared  # written into the central directory (zip64) at close


def test_a_checkpoint_that_inflates_past_memory_is_refused_before_reading_through_the_real_cli(tmp_path):
    _inflating_checkpoint(tmp_path / "bomb.pt", 1 << 44)  # 16 TiB: more than any machine this runs on
    assert (tmp_path / "bomb.pt").stat().st_size < 10_000
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict()))
    res = _cli("inspect", "bomb.pt", "--recipe", "r.yaml", cwd=tmp_path)  # the real process
    assert res.returncode == 7 and res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1 and "inflates to 16,384.0 GiB in memory" in res.stderr
    assert " available" in res.stderr and "internal error" not in res.stderr
    from typer.testing import CliRunner

    from theseus_cli.cli.app import app

    ev = CliRunner().invoke(app, ["eval", str(tmp_path / "bomb.pt"), "--recipe", str(tmp_path / "r.yaml"),
                                  "--device", "cpu"])  # eval reads it the same way (in this process: quicker)
    assert ev.exit_code == 7 and "inflates to 16,384.0 GiB" in ev.stderr and ev.stderr.count("\n") == 1


def test_an_allocator_failure_while_reading_a_checkpoint_is_exit_7(tmp_path, monkeypatch):
    from theseus_cli.errors import DeviceError

    torch.save({"0.weight": torch.zeros(4)}, tmp_path / "w.pt")

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 2147483648 bytes.")
    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(DeviceError, match="ran out of memory reading the checkpoint"):
        read_state_dict(tmp_path / "w.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("PytorchStreamReader failed")))
    with pytest.raises(ModelError, match="not a readable checkpoint"):  # any other RuntimeError stays a bad file
        read_state_dict(tmp_path / "w.pt")
