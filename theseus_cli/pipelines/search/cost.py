"""What a search spends, in gradient steps, and the cap ``budget.max_cost`` puts on it.

**The unit.** One *full conversion* is one run of the **base recipe** as written (its own replace rules, method and
budgets) on the search's training split: what the user would have paid to convert with the hand-written recipe
alone, and so the figure the question "is the search worth it?" needs. ``budget.max_cost: 4`` allows four of them.

**Planned before, measured after.** A rung's gradient steps follow from its recipe before it runs: alignment
stages × epochs (``align.auto.max_epochs`` under auto stage length, the largest override) × steps per epoch, plus
fine-tuning epochs × batches per epoch over the labelled examples. That is an upper bound (auto stage length may stop
a stage early), so a rung is only started when the steps already spent plus its planned steps fit under the cap;
what it ran is then counted from its report. A rung directory counts once however often it is resumed or retried
(the ledger is keyed by candidate and rung), so a killed and resumed search is not charged twice.

Several workers check the cap against the shared study before each rung; two that check at the same moment may
both start, so a shared study can pass the cap by at most one rung per extra worker.
"""

from __future__ import annotations

from typing import Any, Iterable

from theseus_cli.config.recipe import Recipe
from theseus_cli.data.core import batches_per_epoch
from theseus_cli.training.runtime import align_batch_size


def align_batches_per_epoch(recipe: Recipe, n_train: int, device) -> int:
    """Alignment batches in one pass over ``n_train`` inputs (before ``align.max_steps_per_epoch``)."""
    return batches_per_epoch(n_train, min(align_batch_size(recipe, device), n_train))


def planned_steps(recipe: Recipe, stages: int, n_train: int, n_labelled: int, device) -> int:
    """Gradient steps ``recipe`` runs at most on a training split of ``n_train`` inputs (``n_labelled`` labelled)
    when its plan has ``stages`` alignment stages."""
    align = recipe.align
    per_epoch = align_batches_per_epoch(recipe, n_train, device)
    steps = min(align.max_steps_per_epoch or per_epoch, per_epoch)
    epochs = align.auto.max_epochs if align.auto.enabled else align.epochs
    epochs = max([epochs] + [o.epochs for o in align.overrides if o.epochs is not None]) if epochs else 0
    finetune = recipe.finetune.epochs * batches_per_epoch(n_labelled, recipe.data.batch_size)
    return int(stages * epochs * steps + finetune)


def rung_key(entry: dict[str, Any]) -> tuple[str, float]:
    return entry.get("candidate_key", ""), float(entry["fraction"])


def spent_steps(rung_lists: Iterable[list[dict[str, Any]]]) -> int:
    """Measured steps of every rung directory that ran, each counted once (a retried trial resumes the same
    directories)."""
    seen: dict[tuple[str, float], int] = {}
    for rungs in rung_lists:
        for entry in rungs:
            seen[rung_key(entry)] = max(seen.get(rung_key(entry), 0), int(entry["steps"]))
    return sum(seen.values())


def fits(spent: int, planned: int, cap_steps: float, reserve: int = 0) -> bool:
    """Whether a rung of ``planned`` steps may start after ``spent``, keeping ``reserve`` steps for later rungs."""
    return spent + planned <= cap_steps - reserve + 1e-9
