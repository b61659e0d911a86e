"""``theseus search``'s output: a live table of trials on a terminal, the result's summary, and ``inspect`` of a
search file. Every user-derived text is escaped (module paths and labels hold '[…]')."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from theseus_cli.progress import NullProgress


def _e(value) -> str:
    return escape(str(value))


def _num(value, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


class TrialTable:
    """A terminal's view of a search: phase lines printed above a live table with one row per finished trial.
    It is the search's progress (bars of the trials' conversions are not shown: one live display at a time)."""

    def __init__(self, console: Console):
        self.console, self.rows, self.live = console, [], None

    def task(self, description: str, total: int):
        return NullProgress().task(description, total)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def on_trial(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.live is None:
            self.live = Live(self._table(), console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        self.live.update(self._table(), refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()

    def _table(self) -> Table:
        table = Table(title="trials", show_lines=False)
        for col in ("#", "state", "candidate", "budget", "validation"):
            table.add_column(col, justify="right" if col in ("#", "budget", "validation") else "left",
                             overflow="fold")
        for row in self.rows[-40:]:
            table.add_row(str(row["number"]), row["state"], _e(row["candidate"]), _num(row["budget_fraction"], "g"),
                          _num(row["validation_metric"]))
        return table


def print_search(result: dict[str, Any], console: Console) -> None:
    """The winner, its final figures against the goals, the cost, and where the files are."""
    best, metric = result["best"], result["metric"]
    table = Table(title=f"search winner: {_e(best['winner'])}")
    for col in ("", "value"):
        table.add_column(col, justify="left" if not col else "right")
    final, test = best["final"], best["test"]
    table.add_row(f"test {metric}", f"{test['target']:.4f} (guide {test['guide']:.4f}, retention "
                  f"{_num(test['retention'], '.3f')})")
    table.add_row(f"validation {metric}", f"{best['validation_metric']:.4f}")
    if "latency_ms" in final:
        ratio = final["ratio_to_guide"]
        table.add_row("latency (ONNX Runtime, final file)", f"{final['latency_ms']:.3g} ms, ×{ratio['median']:.3g} "
                      f"the guide's ({ratio['min']:.3g}–{ratio['max']:.3g})")
        table.add_row("latency in phase 1", f"{_num(best['phase1_latency_ms'], '.3g')} ms")
        table.add_row("file", f"{_e(final['file'])}, {final['file_bytes'] / 1e6:.3g} MB")
    table.add_row("params", f"{best['params']:,}")
    cost = result["cost"]
    table.add_row("trials", f"{cost['trials']} ({cost['reached_full_budget']} at full budget)")
    table.add_row("compute", f"{_num(cost['full_conversion_equivalents'], '.2f')} full conversions (gradient steps)")
    for name, check in best["gates"]["checks"].items():
        table.add_row(f"goal {name}", f"{'met' if check['passed'] else 'MISSED'}: {_num(check['value'], '.4g')} "
                      f"(goal {check['threshold']:g})")
    console.print(table)
    phase1 = result["phase1"]
    console.print(f"phase 1: {phase1['feasible']} of {phase1['architectures']} architectures met the goals"
                  + (f" ({_e(phase1['dropped'])} dropped)" if phase1["dropped"] else ""), highlight=False)


def print_search_plan(plan: dict[str, Any], console: Console) -> None:
    """``inspect`` of a search file: groups and choices, then each architecture's phase-1 figures."""
    space = plan["space"]
    groups = Table(title=f"search space of {_e(plan['search'])} (base {_e(plan['base'])})")
    for col in ("group", "modules", "choices", "excluded"):
        groups.add_column(col, overflow="fold")
    for g in space["groups"]:
        groups.add_row(_e(g["name"]), str(g["modules"]), _e(", ".join(g["choices"])),
                       _e("; ".join(f"{k}: {v}" for k, v in g["excluded"].items())) or "")
    console.print(groups)
    archs = Table(title="phase 1 (no training): every architecture timed against the guide on ONNX Runtime")
    for col in ("architecture", "params", "latency ms", "× guide", "MB", "feasible"):
        archs.add_column(col, justify="left" if col in ("architecture", "feasible") else "right", overflow="fold")
    for r in plan["phase1"]["architectures"]:
        ratio = r.get("ratio_to_guide", {}).get("median")
        archs.add_row(_e(r["label"]), f"{r['params']:,}", _num(r.get("latency_ms"), ".3g"), _num(ratio, ".3g"),
                      _num(r.get("file_bytes", 0) / 1e6 if "file_bytes" in r else None, ".3g"),
                      "yes" if r["feasible"] else _e("no: " + "; ".join(r["dropped"])))
    console.print(archs)
    guide = plan["phase1"]["guide"]
    console.print(f"guide: fp32 {guide['fp32']['latency_ms']:.3g} ms, int8 {guide['int8']['latency_ms']:.3g} ms; "
                  f"{space['architectures']} architectures × {plan['methods']} methods; {plan['phase1']['feasible']} "
                  f"feasible → {plan['candidates']} candidates for phase 2 (rungs at "
                  f"{', '.join(f'{f:g}' for f in plan['budget']['fractions'])} of the budget)", highlight=False)
