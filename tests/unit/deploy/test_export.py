"""theseus export: ONNX / TorchScript / transformers directories, verified against PyTorch before they land."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from theseus_cli import load_target
from theseus_cli.cli.app import app
from theseus_cli.errors import ExportError
from theseus_cli.target_meta import ArchSpec, TargetMeta
from theseus_cli.deploy.export import Deployable, export_onnx, export_torchscript
from tests.conftest import cli_conversion, tiny_recipe_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return cli_conversion(tmp_path_factory.mktemp("export"), tiny_recipe_dict())[2]


def test_onnx_export_matches_pytorch_under_onnx_runtime(run_dir):
    import onnx
    import onnxruntime as ort

    res = runner.invoke(app, ["export", str(run_dir), "--format", "onnx", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    path = run_dir / "target.onnx"
    assert info["out"] == str(path) and info["parity"]["passed"] and info["parity"]["max_abs_diff"] < 1e-4
    assert [2, 1, 8, 8] in info["parity"]["inputs"] and [5, 1, 8, 8] in info["parity"]["inputs"]  # dynamic batch
    # independently of the exporter's own check: ONNX Runtime on fresh inputs vs the reloaded target
    model = load_target(run_dir)
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-3)
    written = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in written.metadata_props}["theseus"])
    # the exporter's per-node debugging records (stack traces) are not shipped to a device
    assert not any(n.metadata_props or n.doc_string for n in written.graph.node)
    assert meta["input_shape"] == [1, 8, 8] and len(meta["normalization"]["mean"]) == 1 and meta["num_classes"] == 10

    res = runner.invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert res.exit_code == 8 and "--overwrite" in res.output  # an existing export is not clobbered silently


def test_torchscript_export_round_trips(run_dir, tmp_path):
    out = tmp_path / "t.pt"
    res = runner.invoke(app, ["export", str(run_dir / "target.safetensors"), "-f", "torchscript", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    loaded = torch.jit.load(str(out))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), load_target(run_dir)(x).detach())


def test_hf_format_refuses_a_non_transformers_target(run_dir):
    res = runner.invoke(app, ["export", str(run_dir), "--format", "hf"])
    assert res.exit_code == 11 and "needs a transformers target" in res.output


def test_unknown_format_and_exporter_are_one_line_errors(run_dir):
    res = runner.invoke(app, ["export", str(run_dir), "--format", "tflite"])
    assert res.exit_code == 11 and "onnx, torchscript, hf" in res.output
    res = runner.invoke(app, ["export", str(run_dir), "--exporter", "magic"])
    assert res.exit_code == 11 and "auto, dynamo, torchscript" in res.output


class _Branchy(nn.Module):
    """Data-dependent control flow: a trace records one branch, which is wrong for other inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if bool(y.sum() > 0) else y - 100


def _cases():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 4, generator=g) + 5,), (torch.randn(3, 4, generator=g) - 5,)]


def test_a_wrong_export_is_refused_and_nothing_is_written(tmp_path):
    torch.manual_seed(0)
    model = _Branchy().eval()
    with torch.no_grad():
        model.lin.weight.copy_(torch.eye(4))
        model.lin.bias.zero_()
    wrapper = Deployable(model, "classification")
    meta = TargetMeta(guide=ArchSpec(arch="tests:branchy"), input_shape=[4], task="classification")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(wrapper, _cases(), tmp_path / "m.onnx", meta, 1e-4, 1e-3, exporter="torchscript")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_torchscript(wrapper, _cases(), tmp_path / "m.pt", meta, 1e-4, 1e-3)
    assert list(tmp_path.iterdir()) == []


def test_opset_and_tolerances_reach_the_export(run_dir, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", str(run_dir), "-o", str(out), "--opset", "17", "--exporter", "torchscript",
                              "--atol", "0.5", "--rtol", "0", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["opset"] == 17 and info["exporter"] == "torchscript"
    assert info["parity"]["atol"] == 0.5 and info["parity"]["rtol"] == 0.0
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {17}
