import os
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from theseus_cli.models.build import build_model, load_guide, read_state_dict
from theseus_cli.errors import ModelError
from theseus_cli.models.zoo import cnn_small


def test_builds_every_spec_form():
    assert isinstance(build_model("torchvision:resnet18", {"num_classes": 3}), nn.Module)
    assert isinstance(build_model("timm:resnet10t", {"num_classes": 3}), nn.Module)
    assert isinstance(build_model("theseus_cli.zoo:cnn_small", {"width": 2}), nn.Module)


def test_same_seed_same_weights():
    a = build_model("theseus_cli.zoo:cnn_small", {}, seed=3).state_dict()
    b = build_model("theseus_cli.zoo:cnn_small", {}, seed=3).state_dict()
    c = build_model("theseus_cli.zoo:cnn_small", {}, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("torchvision:resnet81", {}, r"unknown torchvision model \(did you mean: resnet18"),
        ("timm:not_a_model_xyz", {}, "unknown timm model"),
        ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "would download weights"),
        ("timm:resnet10t", {"pretrained": True}, "would download weights"),
        ("no_such_module_xyz:fn", {}, "cannot import module"),
        ("theseus_cli.zoo:nothing", {}, "has no callable 'nothing'"),
        ("theseus_cli.zoo:cnn_small", {"bogus": 1}, "bad kwargs"),
        ("theseus_cli.errors:TheseusError", {"message": "x"}, "not a torch.nn.Module"),
    ],
)
def test_bad_specs_are_clear_errors(spec, kwargs, message):
    with pytest.raises(ModelError, match=message):
        build_model(spec, kwargs)


def test_loads_pt_and_safetensors_state_dicts(tmp_path):
    model = cnn_small()
    torch.save(model.state_dict(), tmp_path / "g.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pth")
    save_file(model.state_dict(), str(tmp_path / "g.safetensors"))
    for name in ("g.pt", "wrapped.pth", "g.safetensors"):
        loaded = load_guide("theseus_cli.zoo:cnn_small", {}, tmp_path / name, seed=99)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"weight": _Payload(marker)}, fh)
    with pytest.raises(ModelError, match="refused to unpickle"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_truncated_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="checkpoint not found"):
        read_state_dict(tmp_path / "none.pt")
    torch.save(cnn_small().state_dict(), tmp_path / "g.pt")
    data = (tmp_path / "g.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        read_state_dict(tmp_path / "junk.safetensors")
    state = cnn_small(width=4).state_dict()
    state.pop("8.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match=r"missing keys: 8.bias; unexpected keys: extra.weight; shape mismatch: 0.weight"):
        load_guide("theseus_cli.zoo:cnn_small", {"width": 8}, tmp_path / "odd.pt", seed=0)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_errors_name_the_constructor_to_use_and_the_missing_module_path(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"vit_b_16 sets num_layers itself; to choose it, build with "
                                         r"'torchvision.models.vision_transformer:VisionTransformer'"):
        build_model("torchvision:vit_b_16", {"num_layers": 2})
    (tmp_path / "my_nets.py").write_text("def net():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ModelError, match=r"my_nets.py exists, but the current directory is not on Python's module "
                                         r"path: run with PYTHONPATH=\."):
        build_model("my_nets:net", {})
