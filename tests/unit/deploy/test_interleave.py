"""Latency comparisons alternate the models in one process: checked on the order of calls, never on times."""

import pytest
import torch
import torch.nn as nn

from theseus_cli.deploy.interleave import MIN_ROUNDS, interleaved, plan_rounds


class FakeClock:
    """A clock that only the calls move: model ``name`` takes ``cost[name]`` units, so ratios are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _calls(log: list, clock: FakeClock, cost: dict):
    def make(name):
        def call():
            log.append(name)
            clock.now += cost[name]
        return call
    return {name: make(name) for name in cost}


def test_every_round_runs_both_models_and_the_order_alternates():
    log, clock = [], FakeClock()
    res = interleaved(_calls(log, clock, {"guide": 3.0, "target": 1.0}), 1, budget_s=3 * 4 * 15 * 2, clock=clock)
    rounds, k = res["rounds"], res["per_round"]
    assert rounds == 15 and k == 4
    timed = log[4:]  # two warm-up calls each first
    assert log[:4] == ["guide", "target", "guide", "target"] and len(timed) == rounds * 2 * k
    blocks = [timed[i:i + k] for i in range(0, len(timed), k)]
    assert all(len(set(b)) == 1 for b in blocks)  # a model's calls of a round run back to back
    firsts = [blocks[2 * r][0] for r in range(rounds)]
    assert firsts == ["guide" if r % 2 == 0 else "target" for r in range(rounds)]  # A B, B A, A B, …
    assert all({blocks[2 * r][0], blocks[2 * r + 1][0]} == {"guide", "target"} for r in range(rounds))


def test_the_ratio_is_the_median_of_per_round_ratios_with_its_range():
    log, clock = [], FakeClock()
    cost = {"guide": 3.0, "target": 1.0}
    calls = _calls(log, clock, cost)
    slow_rounds = iter([1.0] * (2 + 2 * 100))  # 2 warm-up calls and 2 rounds at speed, then the guide slows 5×

    def drifting_guide():
        log.append("guide")
        clock.now += 3.0 * next(slow_rounds, 5.0)
    calls["guide"] = drifting_guide
    res = interleaved(calls, 8, budget_s=1e9, rounds=5, clock=clock)
    ratio = res["ratios"]["target"]
    assert res["per_round"] == 100
    # per round, target / guide: 1/3, 1/3, then 1/15 three times; the median follows the majority, the range shows
    # the drift (a ratio of two medians timed apart would be whichever the moments gave)
    assert ratio["median"] == pytest.approx(1 / 15)
    assert ratio["min"] == pytest.approx(1 / 15) and ratio["max"] == pytest.approx(1 / 3)
    assert res["models"]["target"]["median_ms"] == pytest.approx(1e3) and res["models"]["target"]["batch"] == 8


def test_a_slow_model_gets_fewer_calls_a_round_but_at_least_the_minimum_rounds():
    assert plan_rounds(1.0, 2, budget_s=0.01) == (MIN_ROUNDS, 1)
    assert plan_rounds(0.001, 2, budget_s=0.6) == (15, 20)
    assert plan_rounds(1e-9, 2, budget_s=10.0)[1] == 100  # capped


def test_convert_profile_times_guide_and_target_alternately(monkeypatch):
    """profile_pair hands both models to one interleaved() call per batch size: the order of forwards alternates."""
    from theseus_cli.deploy import profile

    order = []

    class Tagged(nn.Module):
        def __init__(self, tag, width):
            super().__init__()
            self.tag, self.lin = tag, nn.Linear(4, width)

        def forward(self, x):
            order.append(self.tag)
            return self.lin(x)

    monkeypatch.setattr(profile, "count_flops", lambda model, x: 1)
    guide, target = Tagged("g", 64), Tagged("t", 2)
    out = profile.profile_pair(guide, target, torch.randn(1, 4), torch.device("cpu"), batches=(1,))
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert set(order) == {"g", "t"} and switches >= 2 * MIN_ROUNDS - 1
    r = out["ratios"]
    assert r["latency_b1_range"][0] <= r["latency_b1"] <= r["latency_b1_range"][1] and r["latency_b1_rounds"] >= MIN_ROUNDS
    assert out["target"]["latency"]["1"]["repeats"] == out["guide"]["latency"]["1"]["repeats"]
