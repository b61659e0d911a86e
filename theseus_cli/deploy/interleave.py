"""Latency comparisons that hold on a shared machine: both models in one process, timed in alternating rounds.

Two medians taken minutes apart are not a ratio: on a loaded or throttling machine the first model can be timed
in a slow minute and the second in a fast one (issue 36 found ratios published that way off by up to 2.5×). :func:`interleaved` warms every model up, then runs ``rounds`` rounds; in each round every model runs
``per_round`` calls back to back, the order reversed every other round (A B, B A, A B, …) so that neither model
always runs first on a warm cache. Each round gives each model the median of its calls, and each model's ratio to
the first (the reference: the guide) is taken *within* the round. The comparison reports the median of those
per-round ratios and their range (min, max): a drifting machine shows up as a wide range, not as a speed-up.

Every latency comparison of the tool goes through here: ``convert``'s deployment table and ``--max-latency-ms``
gate, ``eval --against``, ``export --quantize int8`` (the float file against the int8 one), and the benchmarks.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from theseus_cli.errors import DeviceError

TIME_BUDGET_S = 0.3  # per (model, batch size): repeats stop once this much time was spent, after a few
BUDGET_ENV = "THESEUS_LATENCY_BUDGET_S"  # overrides TIME_BUDGET_S (the test suite times briefly)
ROUNDS = 15
MIN_ROUNDS = 3
MAX_PER_ROUND = 100


def latency_budget() -> float:
    """Seconds to spend timing one (model, batch size): ``$THESEUS_LATENCY_BUDGET_S``, else 0.3."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None:
        return TIME_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise DeviceError(f"{BUDGET_ENV}={raw!r}: not a number of seconds ≥ 0")
    return value


def _timed(call: Callable[[], None], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    t0 = clock()
    call()
    sync()
    return clock() - t0


def _summary(times: list[float], batch: int) -> dict[str, float]:
    times = sorted(times)
    median = statistics.median(times)
    return {"batch": batch, "median_ms": median * 1e3, "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
            "repeats": len(times), "samples_per_s": batch / median if median > 0 else float("inf")}


def plan_rounds(single_call_s: float, models: int, budget_s: float, rounds: int = ROUNDS) -> tuple[int, int]:
    """(rounds, calls per model per round) that spend about ``budget_s`` in all, at least :data:`MIN_ROUNDS` rounds
    of one call each: a slow model gets fewer calls a round, never fewer rounds than that."""
    per_call = max(single_call_s, 1e-6)
    per_round = int(budget_s / (rounds * models * per_call))
    if per_round >= 1:
        return rounds, min(per_round, MAX_PER_ROUND)
    return max(MIN_ROUNDS, min(rounds, int(budget_s / (models * per_call)))), 1


def interleaved(calls: dict[str, Callable[[], None]], batch: int, sync: Callable[[], None] = lambda: None,
                budget_s: float | None = None, rounds: int = ROUNDS,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time every call of ``calls`` (name → one forward on ``batch`` examples) in alternating rounds.

    Returns ``{"models": {name: latency summary}, "ratios": {name: {"median", "min", "max"}}, "rounds",
    "per_round"}``: each summary is over all of the model's timed calls; each ratio is the model's round median over
    the first model's, per round, then summarised. ``budget_s`` defaults to :func:`latency_budget` per model;
    ``clock`` is injectable for tests."""
    names = list(calls)
    if not names:
        raise ValueError("interleaved() needs at least one call")
    budget_s = latency_budget() * len(names) if budget_s is None else budget_s
    warm = {name: _timed(calls[name], sync, clock) for name in names}  # first calls: allocator, kernels, caches
    for name in names:
        calls[name]()
    n_rounds, per_round = plan_rounds(max(warm.values()), len(names), budget_s, rounds)
    times: dict[str, list[float]] = {name: [] for name in names}
    round_medians: list[dict[str, float]] = []
    for r in range(n_rounds):
        medians = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            these = [_timed(calls[name], sync, clock) for _ in range(per_round)]
            times[name] += these
            medians[name] = statistics.median(these)
        round_medians.append(medians)
    return {"models": {name: _summary(times[name], batch) for name in names},
            "ratios": {name: pair_ratio(round_medians, name, names[0]) for name in names[1:]},
            "rounds": n_rounds, "per_round": per_round,
            "round_medians_ms": [{name: v * 1e3 for name, v in m.items()} for m in round_medians]}


def pair_ratio(round_medians: list[dict[str, float]], model: str, reference: str) -> dict[str, float]:
    """``model``'s time over ``reference``'s, per round, summarised: ``{"median", "min", "max"}`` (NaN where no
    round timed the reference above zero). Any two models of one :func:`interleaved` run can be compared so."""
    per = [m[model] / m[reference] for m in round_medians if m[reference] > 0]
    if not per:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(per), "min": min(per), "max": max(per)}


def ratio_text(ratio: dict) -> str:
    """``×2.80 (×2.77–2.86)``: a per-round ratio summary (median and range) for a table or a log line."""
    return f"×{ratio['median']:.2f} (×{ratio['min']:.2f}–{ratio['max']:.2f})"
