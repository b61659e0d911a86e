"""Task-vector transport: identity when A and B are the same, semi-orthogonal maps, every layer type's shapes."""

import json

import pytest
import torch
import torch.nn as nn
import yaml
from typer.testing import CliRunner

from theseus_cli import load_target
from theseus_cli.batch import run_model
from theseus_cli.cli.app import app
from theseus_cli.transport.procrustes import CrossStats, procrustes
from theseus_cli.config.transport import alpha_values
from theseus_cli.transport.deltas import calibrate, move, owners, task_vector_deltas

from tests.conftest import REPO

runner = CliRunner()


def _stats(a: int, b: int, n: int = 400, seed: int = 0) -> CrossStats:
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, a, generator=g, dtype=torch.float64)
    mix = torch.randn(a, b, generator=g, dtype=torch.float64)
    s = CrossStats()
    s.add(xa, xa @ mix + 0.1 * torch.randn(n, b, generator=g, dtype=torch.float64))
    return s


@pytest.mark.parametrize("a,b", [(6, 9), (9, 6), (7, 7)])
def test_maps_are_semi_orthogonal(a, b):
    t = procrustes(_stats(a, b)).t
    assert t.shape == (a, b)
    if a <= b:  # B wider: an isometry from A's features into B's
        torch.testing.assert_close(t @ t.T, torch.eye(a, dtype=t.dtype))
    if a >= b:  # B narrower: a projection
        torch.testing.assert_close(t.T @ t, torch.eye(b, dtype=t.dtype))


def test_an_exact_rotation_is_recovered_with_quality_one():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    s = CrossStats()
    s.add(x, x @ q)
    m = procrustes(s)
    torch.testing.assert_close(m.t, q)
    assert m.quality == pytest.approx(1.0, abs=1e-9)


def test_fused_projection_gets_one_map_per_block():
    m = procrustes(_stats(6, 9), blocks=3)
    t = m.t
    for i in range(3):
        for j in range(3):
            block = t[2 * i: 2 * i + 2, 3 * j: 3 * j + 3]
            assert (block.abs().max() > 0) == (i == j)  # block-diagonal: q→q, k→k, v→v


class Net(nn.Module):
    """Every layer type transport handles, plus ones it does not."""

    def __init__(self, w: int):
        super().__init__()
        self.emb = nn.Embedding(20, 2 * w)
        self.norm = nn.LayerNorm(2 * w)
        self.qkv = nn.Linear(2 * w, 6 * w)
        self.conv = nn.Conv2d(1, w, 3, padding=1)
        self.bn = nn.BatchNorm2d(w)
        self.depthwise = nn.Conv2d(w, w, 3, padding=1, groups=w)
        self.head = nn.Linear(6 * w + w, 3)
        self.scale = nn.Parameter(torch.ones(1))  # model-level tensor

    def forward(self, x):
        ids, img = x
        h = self.qkv(self.norm(self.emb(ids))).mean(1)
        c = self.depthwise(torch.relu(self.bn(self.conv(img)))).mean((2, 3))
        return self.head(torch.cat([h, c], 1)) * self.scale


def _inputs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (n, 5), generator=g), torch.randn(n, 1, 6, 6, generator=g)


def _run(model, x):
    return model(x)


def _tuned(model, seed=3):
    tuned = Net(model.emb.embedding_dim // 2)
    tuned.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return tuned


def _deltas(a, a2, b):
    for m in (a, a2, b):
        m.eval()
    paths = [p for p in owners(a) if p in owners(b)]
    stats = calibrate(a, b, paths, [_inputs()], _run)
    return task_vector_deltas(a, a2, b, stats, center=True, whiten=0.0)


def test_identical_a_and_b_transport_exactly_the_task_vector():
    torch.manual_seed(0)
    a = Net(4)
    a2 = _tuned(a)
    deltas, layers, zero = _deltas(a, a2, a)
    moved = {"emb.weight", "norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "conv.weight", "conv.bias",
             "bn.weight", "bn.bias", "head.weight", "head.bias"}
    assert set(deltas) == moved
    tuned = dict(a2.named_parameters())
    for name, d in deltas.items():
        torch.testing.assert_close(d, (tuned[name] - dict(a.named_parameters())[name]).detach(), atol=1e-6, rtol=1e-5)
    reasons = {z["parameter"]: z["reason"] for z in zero}
    assert reasons["scale"] == "model-level tensor" and "grouped convolution" in reasons["depthwise.weight"]
    assert all(0.99 < (layer["output_quality"] or 1) <= 1 + 1e-9 for layer in layers)


@pytest.mark.parametrize("wb", [6, 3])  # B wider, B narrower
def test_every_layer_type_lands_in_bs_shapes(wb):
    torch.manual_seed(0)
    a, b = Net(4), Net(wb)
    deltas, layers, zero = _deltas(a, _tuned(a), b)
    shapes = dict(b.named_parameters())
    assert all(tuple(d.shape) == tuple(shapes[n].shape) for n, d in deltas.items())
    assert {"conv.weight", "qkv.weight", "emb.weight", "bn.weight", "norm.weight"} <= set(deltas)
    # the head's input mixes two blocks of features: its input map is (7·4) × (7·wb)
    assert next(layer for layer in layers if layer["module"] == "head")["input_map"] == [28, 7 * wb]
    if wb > 4:  # an isometry keeps the size of the update
        for name in ("conv.weight", "qkv.weight"):
            delta_a = (dict(_tuned(a).named_parameters())[name] - dict(a.named_parameters())[name])
            assert deltas[name].norm() == pytest.approx(float(delta_a.norm()), rel=1e-4)


def test_hf_conv1d_and_embeddings_of_two_gpt2_widths():
    from theseus_cli.models.build import build_model

    kw = {"n_layer": 1, "n_head": 2, "n_positions": 8, "vocab_size": 60}
    a = build_model("hf:gpt2", {**kw, "n_embd": 8}, 0, "causal-lm").eval()
    a2 = build_model("hf:gpt2", {**kw, "n_embd": 8}, 1, "causal-lm").eval()
    b = build_model("hf:gpt2", {**kw, "n_embd": 12}, 2, "causal-lm").eval()
    paths = [p for p in owners(a) if p in owners(b)]
    ids = torch.randint(0, 60, (16, 8), generator=torch.Generator().manual_seed(0))
    stats = calibrate(a, b, paths, [ids], run_model)
    deltas, layers, zero = task_vector_deltas(a, a2, b, stats, True, 0.0)
    shapes = dict(b.named_parameters())
    assert all(tuple(d.shape) == tuple(shapes[n].shape) for n, d in deltas.items())
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight",
            "transformer.wpe.weight", "transformer.h.0.ln_1.weight"} <= set(deltas)
    c_attn = next(layer for layer in layers if layer["module"].endswith("attn.c_attn"))
    assert c_attn["output_map"] == [24, 36]  # q, k, v blocks of 8 → 12


def test_move_refuses_what_it_cannot_map():
    lin = nn.Linear(4, 3)
    assert move("w.weight", lin, torch.zeros(3, 4), torch.Size([5, 6]), None, None).delta is None
    conv = nn.Conv2d(2, 3, 3)
    t_in, t_out = torch.eye(2, 4, dtype=torch.float64), torch.eye(3, 5, dtype=torch.float64)
    assert "kernel sizes differ" in move("c.weight", conv, torch.zeros(3, 2, 3, 3), torch.Size([5, 4, 5, 5]), t_in, t_out).reason
    assert move("c.weight", conv, torch.ones(3, 2, 3, 3), torch.Size([5, 4, 3, 3]), t_in, t_out).delta.shape == (5, 4, 3, 3)


def test_alpha_grid():
    assert alpha_values("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        alpha_values("1:0:0.1")


TRANSPORT = {
    "model_a": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 4}},
    "model_b": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 6}},
    "data": {"source": "digits", "batch_size": 64},
    "transport": {"calib_samples": 64, "val_samples": 100, "alpha_grid": "0:2:0.5"},
}


def test_cli_transport_end_to_end_and_b_prime_is_a_usable_target(tmp_path):
    torch.manual_seed(0)
    files = _checkpoints(tmp_path)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump(TRANSPORT))
    args = ["transport", "--recipe", str(recipe), "--base-a", str(files["a"]), "--tuned-a", str(files["a2"]),
            "--base-b", str(files["b"]), "--device", "cpu", "--json"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert "α 5/5: α = 2, validation" in res.stderr and "calibrate: " in res.stderr  # a line per α, without a terminal
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "q"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert [r["alpha"] for r in report["alpha"]["search"]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert report["alpha"]["chosen"] in (0.0, 0.5, 1.0, 1.5, 2.0)
    assert report["calibration"]["samples"] == 64 and report["validation"]["samples"] == 100
    assert {"0.weight", "3.weight", "8.weight", "1.weight"} <= set(report["transported"])
    model = load_target(tmp_path / "o")
    assert model[0].out_channels == 6
    res = runner.invoke(app, ["eval", str(tmp_path / "o"), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metric"]["value"] == pytest.approx(report["metric"]["B_transported"], abs=1e-9)

    # identical A and B with α = 1: B′ carries exactly A′'s weights
    res = runner.invoke(app, ["transport", "--recipe", str(recipe), "--base-a", str(files["a"]), "--tuned-a",
                              str(files["a2"]), "--base-b", str(files["a"]), "--alpha", "1", "--out", str(tmp_path / "same"),
                              "--device", "cpu", "--json"])
    recipe_same = dict(TRANSPORT, model_b=TRANSPORT["model_a"])
    recipe.write_text(yaml.safe_dump(recipe_same))
    res = runner.invoke(app, ["transport", "--recipe", str(recipe), "--base-a", str(files["a"]), "--tuned-a",
                              str(files["a2"]), "--base-b", str(files["a"]), "--alpha", "1", "--out", str(tmp_path / "same"),
                              "--device", "cpu", "--json", "--overwrite"])
    assert res.exit_code == 0, res.output
    got = load_target(tmp_path / "same").state_dict()
    from safetensors.torch import load_file

    want = load_file(str(files["a2"]))
    for k, v in want.items():
        if "running" not in k and "num_batches" not in k:  # statistics are re-estimated, weights are A′'s
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--alpha", "1", "--alpha-grid", "0:1:0.5"])
    assert res.exit_code == 2 and "not both" in res.output


def test_shipped_transport_recipes_validate():

    from theseus_cli.config.transport import load_transport_recipe

    paths = sorted((REPO / "recipes" / "transport").glob("*.yaml"))
    assert paths
    for path in paths:
        r = load_transport_recipe(path)
        assert r.model_a.arch and r.model_b.arch and r.model_a.kwargs != r.model_b.kwargs


def test_transport_recipe_errors_name_the_field(tmp_path):
    from theseus_cli.errors import RecipeError
    from theseus_cli.config.transport import load_transport_recipe

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**TRANSPORT, "transport": {"alpha_grid": "2:1:0.1", "calib_sample": 3}}))
    with pytest.raises(RecipeError) as err:
        load_transport_recipe(path)
    assert "transport.alpha_grid" in str(err.value) and "did you mean 'calib_samples'" in str(err.value)


def test_into_a_permuted_wider_copy_the_transported_model_computes_what_a_tuned_does():
    """B = A with its hidden units permuted and 8 dead units added: a perfect map exists, and transport finds it."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    a2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    a2.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    perm = torch.randperm(24)[:16]  # where A's units sit in B
    b = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
        b[0].weight[perm], b[0].bias[perm] = a[0].weight, a[0].bias
        b[2].weight[:, perm], b[2].bias[:] = a[2].weight, a[2].bias
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(b(x), a(x))
    stats = calibrate(a, b, ["0", "2"], [x], _run)
    deltas, _, zero = task_vector_deltas(a, a2, b, stats, center=True, whiten=0.0)
    assert not zero
    for name, p in b.named_parameters():
        with torch.no_grad():
            p.add_(deltas[name])
    torch.testing.assert_close(b(x), a2(x), atol=1e-5, rtol=1e-4)


def test_calibration_and_validation_can_come_from_another_source(tmp_path):
    files = _checkpoints(tmp_path)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump(TRANSPORT))
    npz = tmp_path / "calib.npz"
    g = torch.Generator().manual_seed(0)
    import numpy as np

    np.savez(npz, x=torch.rand(200, 8, 8, generator=g).numpy(), y=torch.randint(0, 10, (200,), generator=g).numpy())
    res = runner.invoke(app, ["transport", "--recipe", str(recipe), "--base-a", str(files["a"]), "--tuned-a", str(files["a2"]),
                              "--base-b", str(files["b"]), "--calib", str(npz), "--val", str(npz), "--alpha-grid", "0:1:0.5",
                              "--out", str(tmp_path / "o"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["calibration"]["source"] == str(npz) and report["calibration"]["samples"] == 64
    assert report["validation"]["source"] == str(npz) and report["validation"]["samples"] == 100
    assert [r["alpha"] for r in report["alpha"]["search"]] == [0.0, 0.5, 1.0]


def test_whitened_procrustes_recovers_the_rotation_at_any_activation_scale():
    """The tie-breaking ridge is sized from the whitened Grams: sized from the raw ones (std 30 activations) it
    dominated the whitened cross-covariance and bent the map (|T − R| 0.18 instead of 1e-9)."""
    g = torch.Generator().manual_seed(0)
    d = 16
    r, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    stats = CrossStats()
    for _ in range(50):
        xa = 30 * torch.randn(4096, d, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.2, 2, d, dtype=torch.float64))
        stats.add(xa, xa @ r)
    for whiten in (0.0, 0.5, 1.0):
        assert float((procrustes(stats, whiten=whiten).t - r).abs().max()) < 1e-6


def _checkpoints(tmp_path) -> dict:
    """A, A′ (width 4) and B (width 6): seeded zoo CNNs saved as safetensors."""
    from safetensors.torch import save_file

    from theseus_cli.models.zoo import cnn_small

    files = {}
    for name, width, seed in (("a", 4, 0), ("a2", 4, 1), ("b", 6, 2)):
        torch.manual_seed(seed)
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in cnn_small(10, 1, width).state_dict().items()}, str(files[name]))
    return files
