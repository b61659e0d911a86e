"""init: activation_svd — the truncated SVD weighted by the inputs a module receives: exact at full rank, better than
the plain SVD on those inputs below it, measured on real tokens only, and fed by the conversion's training inputs."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from theseus_cli.batch import TokenBatch
from theseus_cli.models.hooks import input_moments
from theseus_cli.replacements import IOShapes, get_replacement
from theseus_cli.replacements.rank import svd_factors
from theseus_cli.surgery.plan import PlanEntry, apply_entries


def _anisotropic_inputs(n: int = 4000, d: int = 16) -> torch.Tensor:
    """Inputs that live mostly in a few directions, as a trained network's activations do."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(1, -2, d)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return (torch.randn(n, d, generator=g) * scales) @ basis.T


def _lowrank(old: nn.Module, rank: int, init: str, moment=None) -> nn.Module:
    rep = get_replacement("lowrank_linear")
    return rep.build(old, rep.params_model(rank=rank, init=init), IOShapes((16,), (12,), None, moment))


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 12), lambda: Conv1D(12, 16)], ids=["Linear", "Conv1D"])
def test_full_rank_reproduces_the_module_and_low_rank_beats_the_plain_svd_on_its_inputs(make):
    torch.manual_seed(0)
    old = make()
    x = _anisotropic_inputs()
    moment = x.double().T @ x.double() / len(x)
    with torch.no_grad():
        y = old(x)
        torch.testing.assert_close(_lowrank(old, 12, "activation_svd", moment)(x), y, atol=1e-5, rtol=1e-5)
        err = {init: (_lowrank(old, 4, init, moment)(x) - y).pow(2).mean().item() for init in ("svd", "activation_svd")}
    assert err["activation_svd"] < 0.5 * err["svd"], err  # the weighting is what buys the start


def test_a_low_rank_start_is_the_optimum_on_those_inputs():
    """No other rank-r map does better on the inputs than B·A (Eckart–Young in the whitened space)."""
    torch.manual_seed(1)
    w, x = torch.randn(12, 16, dtype=torch.float64), _anisotropic_inputs().double()
    a, b = svd_factors(w, 4, x.T @ x / len(x))
    best = ((x @ (w - b.double() @ a.double()).T) ** 2).mean()
    for _ in range(20):  # perturbed factors never beat it
        pa, pb = a.double() + 1e-2 * torch.randn_like(a.double()), b.double() + 1e-2 * torch.randn_like(b.double())
        assert ((x @ (w - pb @ pa).T) ** 2).mean() >= best - 1e-12


def test_without_inputs_it_is_the_plain_svd():
    old = nn.Linear(16, 12)
    with torch.no_grad():
        for lhs, rhs in zip(_lowrank(old, 4, "activation_svd").parameters(), _lowrank(old, 4, "svd").parameters()):
            torch.testing.assert_close(lhs, rhs)


def test_input_moments_count_real_tokens_only():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)

    class ByIds(nn.Module):  # takes input_ids/attention_mask like a transformers model
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(10, 4), lin

        def forward(self, input_ids, attention_mask):
            return self.lin(self.emb(input_ids))

    model = ByIds()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = input_moments(model, ["lin"], [TokenBatch(ids, mask)])["lin"]
    real = model.emb(torch.tensor([1, 2, 3, 4, 5])).double()
    torch.testing.assert_close(got, real.T @ real / 5)


def test_apply_entries_measures_the_inputs_where_the_module_sits():
    """Through a conversion's path: the start fits the inputs the model gives the module (here a scaled, skewed
    projection), far better than the plain SVD; asked for without calibration inputs it falls back to the SVD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 12))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.logspace(1, -2, 16)))
    x = torch.randn(512, 16)
    entry = PlanEntry("1", "Linear", 0, "lowrank_linear", {"rank": 4, "init": "activation_svd", "calibration": 256},
                      (16,), (12,), 0, 0)
    seen = []

    def calibration(n):
        seen.append(n)
        return [x[:128], x[128:n]]

    errors = {}
    for name, calib in (("activation_svd", calibration), ("fallback", None)):
        target = nn.Sequential(*[m for m in [nn.Linear(16, 16), nn.Linear(16, 12)]])
        target.load_state_dict(model.state_dict())
        apply_entries(target, [entry], calib)
        with torch.no_grad():
            errors[name] = (target(x) - model(x)).pow(2).mean().item()
    assert seen == [256]
    assert errors["activation_svd"] < 0.1 * errors["fallback"], errors


def test_refused_for_convolutions():
    conv = nn.Conv2d(3, 6, 3)
    for name in ("lowrank_conv", "lowrank_linear"):
        rep = get_replacement(name)
        reason = rep.check_fit(conv, rep.params_model(init="activation_svd"), IOShapes((3, 8, 8), (6, 6, 6)))
        assert reason is not None and "activation_svd" in reason, (name, reason)
