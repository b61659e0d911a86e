"""The end of a search: the winner, ``DIR/best``, the test metric computed once, ``search.json`` and ``pareto.png``.

* **The pool.** Every trial that reached the full budget and kept ``goals.min_retention`` on the validation split,
  and the guide itself as its fp32 and its int8 file where they meet the phase-1 goals (scored on the same
  validation inputs, the int8 file by ONNX Runtime). The winner has the best validation metric, or, under
  ``validation.choose: one-se`` (the default) and a metric that is a share of the validation inputs, is the
  fastest candidate within one standard error of the best (:meth:`Finish.choose`); so plain quantisation wins
  whenever no conversion beats it, and the result says so (``choice`` in ``search.json`` says how it was chosen).
* **``DIR/best``.** For a conversion: the winning trial's full-budget run directory (``target.safetensors``,
  ``report.json``, ``alignment.png``), its ONNX and int8 exports, both measured again (the file of the goal's
  precision timed alternating with the guide's), and ``report.json["search"]`` with the **test** metric of the
  target and of the guide, computed here once, after the choice. For the guide: its file and the same section.
* **Gates.** The goals are checked again on what ``best/`` holds: its measured file's latency and size, its
  parameters and its test retention. A miss exits 10 with every file written.
* **Several workers.** Only the worker that finds no trial running or waiting writes the result (under a lock);
  the others return None.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from optuna.trial import TrialState

from theseus_cli.artifacts import load_target, versions, write_json
from theseus_cli.config.search import Goals
from theseus_cli.errors import GateError
from theseus_cli.pipelines.plots import plot_pareto
from theseus_cli.pipelines.search.best import test_metric, write_best
from theseus_cli.pipelines.search.cost import spent_steps
from theseus_cli.pipelines.search.files import BEST_DIR, PARETO_FILE, RESULT_FILE
from theseus_cli.pipelines.search.screen import MB, goal_problems
from theseus_cli.pipelines.search.study import counted
from theseus_cli.pipelines.search.trials import trial_row
from theseus_cli.tasks import get_task

if TYPE_CHECKING:
    from theseus_cli.pipelines.search.pipeline import Search

GUIDE_SAW = 0.99  # a guide at least this accurate on the validation split most likely trained on it



def overshoot(record: dict[str, Any], goals: Goals) -> float:
    """How far ``record`` is from the goals: the largest ratio of a measured figure to its goal, less 1."""
    ratios = [0.0]
    if goals.max_latency_ms is not None and "latency_ms" in record:
        ratios.append(record["latency_ms"] / goals.max_latency_ms - 1)
    if goals.max_latency_ratio is not None and "ratio_to_guide" in record:
        ratios.append(record["ratio_to_guide"]["median"] / goals.max_latency_ratio - 1)
    if goals.max_params is not None:
        ratios.append(record["params"] / goals.max_params - 1)
    if goals.max_file_mb is not None and "file_bytes" in record:
        ratios.append(record["file_bytes"] / MB / goals.max_file_mb - 1)
    return max(ratios)


@contextmanager
def _finishing(out: Path) -> Iterator[bool]:
    """Whether this worker holds the finishing lock (another worker may be writing the result)."""
    fd = os.open(out / ".finish.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def finish(search: "Search") -> dict[str, Any] | None:
    with _finishing(search.out) as mine:
        if (search.out / RESULT_FILE).is_file():
            return json.loads((search.out / RESULT_FILE).read_text())
        trials = [t for t in (search.study.get_trials(deepcopy=False) if search.study is not None else []) if counted(t)]
        busy = [t.number for t in trials if t.state == TrialState.RUNNING]  # queued ones left: the cost cap
        if not mine or busy:
            search.progress.log(f"search: trial{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} still run on "
                                "other workers; the last worker to finish writes the result" if busy else
                                "search: another worker is writing the result")
            return None
        return Finish(search, trials).run()


class Finish:
    def __init__(self, search: "Search", trials: list):
        self.s, self.trials = search, trials
        self.task = get_task(search.base.task)
        self.goals = search.search.goals

    def run(self) -> dict[str, Any]:
        s = self.s
        s.progress.log("finish: scoring the guide's files on the validation split, choosing the winner")
        rows = [trial_row(t) for t in self.trials]
        pool = self.guide_entries() + [self.trial_entry(r) for r in rows if r["state"] == "complete"]
        feasible = [e for e in pool if e["feasible"]]
        result = self.result(rows, pool)
        if not feasible:
            result["state"] = "no feasible candidate"
            measured = pool + [{**r, "kind": "architecture", "reasons": r["dropped"]} for r in s.phase1.values()
                               if r.get("exported")]
            nearest = min(measured, key=lambda e: (overshoot(e, self.goals), -self.sign * (e.get("validation_metric") or 0)))
            result["nearest"] = nearest
            self.write(result, pool)
            raise GateError(f"no candidate meets the goals; nearest: {nearest['label']} "
                            f"({'; '.join(nearest['reasons'])}) — {s.out}/search.json lists every candidate")
        winner, result["choice"] = self.choose(feasible)
        s.progress.log(f"finish: winner {winner['label']} (validation {winner['validation_metric']:.4f})"
                       + ("; plain quantisation of the guide beats every conversion" if winner["label"] == "guide int8" else ""))
        best = write_best(s, winner, self.goals)
        result.update(state="finished", winner={**winner, **best["summary"]}, best=best["summary"],
                      ranking=self.ranking(pool, winner, best), cost=self.cost(rows, winner))
        self.write(result, pool)
        if not best["summary"]["gates"]["passed"]:
            failed = [f"{k}: {v['value']:.4g} (goal {v['threshold']:g})"
                      for k, v in best["summary"]["gates"]["checks"].items() if not v["passed"]]
            raise GateError(f"the winner misses a goal on its final files: {'; '.join(failed)} (every file is written "
                            f"in {s.out})")
        return result

    def choose(self, feasible: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The winner, and how it was chosen. ``best``: the best validation metric. ``one-se`` (the default): where
        the metric is a share of the ``n`` validation inputs (accuracy, agreement with the guide), its standard error
        at the best value p is sqrt(p(1-p)/n); every candidate within one of it of the best is as good as the
        validation split can tell, and the fastest of them (median latency ratio to the guide) wins — Breiman's
        one-standard-error rule, with latency as the simplicity it prefers. Other metrics: the best."""
        top = max(feasible, key=lambda e: (self.sign * e["validation_metric"], -self._speed_key(e)))
        rule, n = self.s.search.validation.choose, int(self.s.validation["size"])
        if rule != "one-se" or self.task.metric != "accuracy":
            return top, {"rule": "best", "best": top["label"]}
        p = min(max(float(top["validation_metric"]), 0.0), 1.0)
        se = math.sqrt(p * (1 - p) / max(n, 1))
        near = [e for e in feasible if self.sign * e["validation_metric"] >= self.sign * top["validation_metric"] - se]
        winner = min(near, key=lambda e: (self._speed_key(e), -self.sign * e["validation_metric"]))
        return winner, {"rule": "one-se", "best": top["label"], "best_validation": top["validation_metric"],
                        "standard_error": se, "within_one_se": [e["label"] for e in near]}

    @staticmethod
    def _speed_key(entry: dict[str, Any]) -> float:
        ratio = entry.get("ratio_to_guide") or {}
        return float(ratio.get("median", entry.get("latency_ms", math.inf)))

    @property
    def sign(self) -> float:
        return 1.0 if self.task.higher_is_better else -1.0

    def retention(self, value: float, guide: float) -> float:
        from theseus_cli.pipelines.checks import retention

        return retention(self.task, guide, value)

    def guide_entries(self) -> list[dict[str, Any]]:
        metrics = self.s.evaluate_guide()
        self.guide_validation = metrics["fp32"]
        self.warn_if_guide_saw_validation(metrics["fp32"])
        out = []
        for precision in ("fp32", "int8"):
            record = {**self.s.guide_files[precision], "label": f"guide {precision}", "kind": "guide",
                      "precision": precision, "validation_metric": metrics[precision]}
            record["validation_retention"] = self.retention(metrics[precision], metrics["fp32"])
            out.append(self.judged(record))
        return out

    def warn_if_guide_saw_validation(self, guide_accuracy: float) -> None:
        """A guide (almost) perfect on held-out labelled inputs was most likely trained on them: ranked on those
        inputs, a candidate scores for what it inherits of the guide's memory, not for how it generalises (the
        ResNet-18 search of docs/BENCHMARKS.md: guide 1.0, trials 0.96-0.97 on validation, 0.77 on test). The
        search cannot tell which inputs a guide saw; it says so, and how to avoid it."""
        if self.s.validation.get("rank_by") != "labels" or self.task.metric != "accuracy" or guide_accuracy < GUIDE_SAW:
            return
        text = (f"the guide scores {guide_accuracy:.3f} on the validation split: it was most likely trained on these "
                "labelled inputs, so the ranking rewards what the trials inherit of the guide's memory; train the guide "
                "without them (theseus train-guide --recipe on this search file leaves them out) for a ranking that "
                "measures generalisation")
        self.s.warnings.append(text)
        self.s.progress.log(f"warning: {text}")

    def trial_entry(self, row: dict[str, Any]) -> dict[str, Any]:
        cand = next(c for c in self.s.candidates if c.label == row["candidate"])
        p1 = self.s.phase1[cand.arch.digest]
        record = {"label": cand.label, "kind": "conversion", "trial": row["number"], "candidate_key": cand.key,
                  "precision": self.goals.runtime.precision, "params": p1["params"], "file_bytes": p1["file_bytes"],
                  "latency_ms": p1["latency_ms"], "ratio_to_guide": p1["ratio_to_guide"],
                  "validation_metric": row["validation_metric"], "validation_retention": row["validation_retention"],
                  "rungs": len(row["rungs"])}
        return self.judged(record)

    def judged(self, record: dict[str, Any]) -> dict[str, Any]:
        reasons = goal_problems(record, self.goals)
        keep = self.goals.min_retention
        if keep is not None and (record["validation_retention"] or 0) < keep:
            reasons.append(f"validation retention {record['validation_retention']:.3f} < {keep:g}")
        return {**record, "reasons": reasons, "feasible": not reasons}

    def result(self, rows: list[dict], pool: list[dict]) -> dict[str, Any]:
        s = self.s
        return {"search": str(s.path.resolve()), "base": s.search.base, "digest": s.digest, "versions": versions(),
                "device": str(s.session.device), "task": s.base.task, "metric": self.task.metric,
                "higher_is_better": self.task.higher_is_better, "goals": self.goals.model_dump(),
                "budget": {**s.search.budget.model_dump(), "fractions": s.fractions},
                "validation": s.validation, "space": s.space.summary(),
                "methods": [f"{m}({x})" if x else m for m, x in s.methods()],
                "phase1": {"architectures": len(s.phase1), "feasible": sum(r["feasible"] for r in s.phase1.values()),
                           "dropped": s.drop_summary(), "seconds": s.phase1_seconds, "guide": s.guide_files,
                           "records": list(s.phase1.values())},
                "candidates": len(s.candidates), "incumbent": s.incumbent.label if s.incumbent else None,
                "trials": rows, "pool": pool, "pareto_front": pareto_front(pool, self.sign),
                "warnings": s.warnings, "wall_seconds": time.perf_counter() - s.started}

    def cost(self, rows: list[dict], winner: dict) -> dict[str, Any]:
        """What the search spent, in gradient steps and in full conversions (one run of the base recipe as written:
        :mod:`theseus_cli.pipelines.search.cost`), and the nominal budget fractions for comparison."""
        steps = spent_steps(row["rungs"] for row in rows)
        return {"nominal": sum(f["fraction"] for row in rows for f in row["rungs"]),
                "gradient_steps": steps, "full_conversion_steps": self.s.full_steps,
                "full_conversion_unit": "one run of the base recipe as written",
                "full_conversion_equivalents": steps / self.s.full_steps, "cap": self.s.search.budget.max_cost,
                "trial_seconds": sum(r["seconds"] for row in rows for r in row["rungs"]),
                "trials": len(rows), "reached_full_budget": sum(bool(row["full_budget"]) for row in rows),
                "not_run_cost_cap": sum(row["stopped"] == "cost cap: not run" for row in rows)}

    def ranking(self, pool: list[dict], winner: dict, best: dict) -> dict[str, Any]:
        """How well the validation ranking predicted the test metric, over the conversions at full budget (their
        test metric computed after the choice, for this report only)."""
        full = [e for e in pool if e["kind"] == "conversion"]
        for e in full:
            e["test_metric"] = (best["summary"]["test"]["target"] if e["label"] == winner["label"] else
                                test_metric(self.s, load_target(self.s.trial_dir_of(e), "cpu")))
        if len(full) < 3:
            return {"trials": len(full), "spearman": None, "note": "fewer than 3 trials reached the full budget"}
        from scipy.stats import spearmanr

        rho = spearmanr([e["validation_metric"] for e in full], [e["test_metric"] for e in full]).statistic
        return {"trials": len(full), "spearman": None if math.isnan(rho) else float(rho),
                "rank_by": self.s.validation["rank_by"]}

    def write(self, result: dict[str, Any], pool: list[dict]) -> None:
        s = self.s
        plot_pareto(s.out / PARETO_FILE, [e for e in pool if "latency_ms" in e], result["pareto_front"],
                    self.task.metric, self.goals.max_latency_ms, f"{s.base.guide.arch}: {len(pool) - 2} conversions "
                    "at full budget and the guide")
        result["files"] = {"result": RESULT_FILE, "pareto": PARETO_FILE, "best": BEST_DIR if result.get("best") else None}
        write_json(s.out / RESULT_FILE, result)  # last: its presence marks a finished search
        s.progress.log(f"wrote {s.out}")


def pareto_front(pool: list[dict], sign: float) -> list[str]:
    """Labels of the candidates no other beats on both validation metric and latency."""
    points = [e for e in pool if "latency_ms" in e and e.get("validation_metric") is not None]
    front = []
    for e in points:
        dominated = any(o is not e and o["latency_ms"] <= e["latency_ms"]
                        and sign * o["validation_metric"] >= sign * e["validation_metric"]
                        and (o["latency_ms"] < e["latency_ms"] or sign * o["validation_metric"] > sign * e["validation_metric"])
                        for o in points)
        if not dominated:
            front.append(e["label"])
    return front
