"""Params, FLOPs and latency as `eval`, `convert`'s report and the latency gate use them."""

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from theseus_cli.batch import TokenBatch
from theseus_cli.deploy.profile import compare, profile_pair, count_flops, count_params, measure_latency, profile_model



def test_params_count_tied_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_params(nn.ModuleList([emb, head])) == 40


def test_flops_of_a_linear_layer_are_two_per_multiply_add():
    assert count_flops(nn.Linear(8, 3), torch.randn(1, 8)) == 2 * 8 * 3


@pytest.mark.parametrize("hide", [False, True])
def test_flops_of_recurrent_layers_counted_once_seen_or_not(hide, monkeypatch):
    rnn = nn.RNN(6, 5, num_layers=2, batch_first=True)
    if hide:  # as under cuDNN: one fused kernel the flop counter has no formula for
        real = nn.RNN.forward

        def opaque(self, x, hx=None):
            with torch.utils._python_dispatch._disable_current_modes():
                return real(self, x, hx)

        monkeypatch.setattr(nn.RNN, "forward", opaque)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = rnn, nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    t = 7
    expected = t * 2 * 5 * (6 + 5) + t * 2 * 5 * (5 + 5) + t * 2 * 5 * 2
    x = torch.randn(1, t, 6)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        Net()(x)
    assert counter.get_total_flops() == (t * 2 * 5 * 2 if hide else expected)  # what the counter alone sees
    assert count_flops(Net(), x) == expected


def test_latency_is_measured_per_batch_size_and_profiles_compare():
    small, big = nn.Linear(16, 4), nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 4))
    lat = measure_latency(small, torch.randn(1, 16), 8, torch.device("cpu"), budget_s=0.01)
    assert lat["batch"] == 8 and lat["median_ms"] > 0 and lat["repeats"] >= 3 and lat["p90_ms"] >= lat["median_ms"]
    a = profile_model(small, torch.randn(3, 16), torch.device("cpu"), (1, 4))
    b = profile_model(big, torch.randn(3, 16), torch.device("cpu"), (1, 4))
    assert set(a["latency"]) == {"1", "4"} and a["flops_per_example"] == 2 * 16 * 4
    ratios = compare(a, b)
    assert ratios["params"] == b["params"] / a["params"] and ratios["flops"] > 10
    assert "latency_b4" not in ratios  # two separately timed medians make no ratio
    pair = profile_pair(small, big, torch.randn(3, 16), torch.device("cpu"), (1, 4))
    assert pair["ratios"]["params"] == ratios["params"] and set(pair["target"]["latency"]) == {"1", "4"}
    lo, hi = pair["ratios"]["latency_b4_range"]
    assert lo <= pair["ratios"]["latency_b4"] <= hi and pair["ratios"]["latency_b4_rounds"] >= 3


def test_token_batches_are_profiled_with_their_mask():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)

        def forward(self, input_ids, attention_mask):
            return (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)

    x = TokenBatch(torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    prof = profile_model(Bag(), x, torch.device("cpu"), (1, 3))
    assert prof["params"] == 400 and prof["latency"]["3"]["batch"] == 3


def test_attention_flops_are_counted_on_the_cpu_too():
    class Attend(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    b, h, t, d = 1, 2, 30, 16
    assert count_flops(Attend(), torch.randn(b, h, t, d)) == 2 * (2 * b * h * t * t * d)  # scores, then values


def test_the_latency_budget_comes_from_the_environment_and_a_bad_value_is_one_line(monkeypatch):
    from theseus_cli.deploy.profile import MIN_REPEATS, latency_budget
    from theseus_cli.errors import DeviceError

    monkeypatch.setenv("THESEUS_LATENCY_BUDGET_S", "0")
    assert latency_budget() == 0.0
    assert measure_latency(nn.Linear(4, 2), torch.randn(1, 4), 2, torch.device("cpu"))["repeats"] == MIN_REPEATS
    monkeypatch.delenv("THESEUS_LATENCY_BUDGET_S")
    assert latency_budget() == 0.3
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("THESEUS_LATENCY_BUDGET_S", bad)
        with pytest.raises(DeviceError, match="THESEUS_LATENCY_BUDGET_S"):
            latency_budget()
