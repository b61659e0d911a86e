"""The paper's Figure 5 for one run: per-stage alignment losses and final per-layer similarity."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from theseus_cli.artifacts import atomic_write


def plot_alignment(path: Path, stages: list[dict], layer_sim: dict[str, dict[str, float]], metric: str, title: str) -> None:
    """Left: the optimised loss of every stage, in order. Right: 1 − similarity per layer after alignment,
    under every metric the report holds (CKA, unbiased CKA, mutual-kNN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    offset = 0
    cmap = plt.get_cmap("viridis")
    for i, stage in enumerate(stages):
        losses = stage["losses"]
        if not losses:
            continue
        xs = range(offset, offset + len(losses))
        left.plot(xs, [max(v, 1e-6) for v in losses], color=cmap(i / max(1, len(stages) - 1)), lw=1,
                  label=_stage_label(i, stage["introduced"]))
        offset += len(losses)
    left.set_yscale("log")
    left.set_xlabel("alignment step (stages in order)")
    left.set_ylabel({"cka": "mean 1 − CKA", "ucka": "mean 1 − unbiased CKA", "dmnn": "mean D-MNN KL",
                    "mse": "mean ‖t − g‖² / ‖g‖²", "distill": "T²·KL of the outputs"}.get(metric, f"mean {metric} loss") + ("" if metric == "distill" else " over aligned layers"))
    left.set_title("alignment loss per stage")
    if offset and len(stages) <= 12:  # inside its own panel (no legend where no stage trained: distill, identity): a legend beside it ran into the other one
        left.legend(fontsize=6, loc="upper right", ncols=1 if len(stages) <= 6 else 2, framealpha=0.8)

    names = list(layer_sim)
    metrics = [m for m in ("cka", "ucka", "mknn") if all(m in layer_sim[n] for n in names)]
    labels = {"cka": "1 − CKA", "ucka": "1 − unbiased CKA", "mknn": "1 − mutual-kNN overlap"}
    width = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        right.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))],
                  [1.0 - layer_sim[n][m] for n in names], width, label=labels[m])
    every = max(1, math.ceil(len(names) / 30))  # at most 30 layer names under the bars, evenly spaced
    right.set_xticks(range(0, len(names), every), names[::every], rotation=60, ha="right", fontsize=7)
    right.set_ylabel("dissimilarity after alignment (held-out)")
    right.legend(fontsize=7)
    right.set_title("final per-layer dissimilarity")
    fig.suptitle(title, fontsize=10)
    with warnings.catch_warnings():  # a layout engine that cannot fit every label says so on stderr; the plot is fine
        warnings.simplefilter("ignore", UserWarning)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _stage_label(index: int, introduced: list[str]) -> str:
    """``3: layers.1.0.conv1 (+4)``: the stage's first module and how many more, short enough for a legend."""
    first = introduced[0] if len(introduced[0]) <= 40 else "…" + introduced[0][-39:]
    return f"{index + 1}: {first}" + (f" (+{len(introduced) - 1})" if len(introduced) > 1 else "")


def plot_pareto(path: Path, points: list[dict], front: list[str], metric: str, goal_ms: float | None, title: str) -> None:
    """A search's candidates: validation ``metric`` against phase-1 latency (ms), the guide's two files marked,
    the Pareto front joined, the latency goal drawn as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    for p in points:
        guide = p["kind"] == "guide"
        ax.scatter(p["latency_ms"], p["validation_metric"], marker="*" if guide else "o", s=160 if guide else 30,
                   color="black" if guide else ("tab:green" if p["feasible"] else "tab:gray"), zorder=3,
                   label=p["label"] if guide else None)
    on_front = sorted((p for p in points if p["label"] in front), key=lambda p: p["latency_ms"])
    if on_front:
        ax.plot([p["latency_ms"] for p in on_front], [p["validation_metric"] for p in on_front], color="tab:green",
                lw=1, label="Pareto front")
    if goal_ms is not None:
        ax.axvline(goal_ms, color="tab:red", ls="--", lw=1, label=f"goal: {goal_ms:g} ms")
    ax.set_xlabel("latency on ONNX Runtime (ms, phase 1)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
