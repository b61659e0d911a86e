"""The paper's Figure 5 for one run: per-stage alignment losses and final per-layer similarity."""

from __future__ import annotations

from pathlib import Path

from theseus_cli.artifacts import atomic_write


def plot_alignment(path: Path, stages: list[dict], layer_sim: dict[str, dict[str, float]], metric: str, title: str) -> None:
    """Left: the optimised loss of every stage, in order. Right: 1 − similarity per layer after alignment,
    under every metric the report holds (CKA, unbiased CKA, mutual-kNN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    offset = 0
    cmap = plt.get_cmap("viridis")
    for i, stage in enumerate(stages):
        losses = stage["losses"]
        if not losses:
            continue
        xs = range(offset, offset + len(losses))
        left.plot(xs, [max(v, 1e-6) for v in losses], color=cmap(i / max(1, len(stages) - 1)), lw=1,
                  label=f"{i + 1}: {', '.join(stage['introduced'])}")
        offset += len(losses)
    left.set_yscale("log")
    left.set_xlabel("alignment step (stages in order)")
    left.set_ylabel({"cka": "mean 1 − CKA", "ucka": "mean 1 − unbiased CKA", "dmnn": "mean D-MNN KL",
                    "mse": "mean ‖t − g‖² / ‖g‖²", "distill": "T²·KL of the outputs"}.get(metric, f"mean {metric} loss") + ("" if metric == "distill" else " over aligned layers"))
    left.set_title("alignment loss per stage")
    if len(stages) <= 12:
        left.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    names = list(layer_sim)
    metrics = [m for m in ("cka", "ucka", "mknn") if all(m in layer_sim[n] for n in names)]
    labels = {"cka": "1 − CKA", "ucka": "1 − unbiased CKA", "mknn": "1 − mutual-kNN overlap"}
    width = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        right.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))],
                  [1.0 - layer_sim[n][m] for n in names], width, label=labels[m])
    right.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("dissimilarity after alignment (held-out)")
    right.legend(fontsize=7)
    right.set_title("final per-layer dissimilarity")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
