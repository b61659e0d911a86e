"""Quality gates for CI: fail a conversion whose target is not good or fast enough.

``--min-retention R``: the target must keep at least R of the guide's quality — the
report's ``metric.retention``, target/guide for accuracy-like metrics and guide/target for
perplexity, so 1.0 always means "as good as the guide". ``--max-latency-ms L``: the
target's median batch-1 forward latency on the conversion's device (``deployment.target``
in the report) must be at most L. A failed gate does not discard the run: every file is
written and complete, ``report.json`` holds the verdict under ``gates``, and the CLI exits
with code 10 and one line naming the gate, the threshold and the measured value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from theseus_cli.errors import GateError


@dataclass(frozen=True)
class Gates:
    min_retention: float | None = None
    max_latency_ms: float | None = None

    @property
    def any(self) -> bool:
        return self.min_retention is not None or self.max_latency_ms is not None


def evaluate_gates(gates: Gates, report: dict[str, Any]) -> dict[str, Any]:
    """Each gate's threshold, measured value and verdict, plus ``passed`` (all of them)."""
    results: dict[str, Any] = {}
    if gates.min_retention is not None:
        value = report["metric"]["retention"]
        results["min_retention"] = {"threshold": gates.min_retention, "value": value,
                                    "passed": value is not None and value >= gates.min_retention}
    if gates.max_latency_ms is not None:
        value = report["deployment"]["target"]["latency"]["1"]["median_ms"]
        results["max_latency_ms"] = {"threshold": gates.max_latency_ms, "value": value,
                                     "passed": value <= gates.max_latency_ms}
    return {"checks": results, "passed": all(r["passed"] for r in results.values())}


def raise_if_failed(report: dict[str, Any], out: str) -> None:
    """:class:`GateError` naming every failed gate of ``report["gates"]`` (nothing if none or all passed)."""
    verdict = report.get("gates")
    if not verdict or verdict["passed"]:
        return
    parts = []
    for name, r in verdict["checks"].items():
        if r["passed"]:
            continue
        value = "none" if r["value"] is None else f"{r['value']:.4g}"
        if name == "min_retention":
            parts.append(f"--min-retention {r['threshold']:g}: the target kept {value} of the guide's "
                         f"{report['metric']['name']}")
        else:
            parts.append(f"--max-latency-ms {r['threshold']:g}: the target's batch-1 latency is {value} ms "
                         f"on {report['deployment']['target'].get('latency_device', report['device'])}")
    raise GateError("quality gate failed: " + "; ".join(parts) + f" (the run's files are complete in {out})")
