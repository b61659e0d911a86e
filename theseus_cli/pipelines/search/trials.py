"""Phase 2 of a search: the feasible candidates' short conversions, ranked on the validation split, the best
promoted rung by rung to the full budget by Optuna's pruner (:mod:`theseus_cli.pipelines.search.study`).

A trial is one candidate. At rung ``r`` it runs a normal conversion (``convert``'s pipeline, into
``DIR/trials/<candidate>/r<r>``) at ``budget.fractions()[r]`` of the base recipe's alignment and fine-tuning,
reports the validation metric, and continues only if the pruner keeps it. Before each rung the study's spending
so far (in full-conversion equivalents: the budget fractions of every rung run, by every worker) is checked
against ``budget.max_cost``; a rung that would pass it is not run and the trial ends pruned ("cost cap").
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from theseus_cli.errors import TheseusWarning
from theseus_cli.pipelines.search.study import (STUDY_NAME, counted, enqueue_all, from_queue, make_pruner,
                                                make_sampler, open_storage, recover, rung_step, wait_until_queued,
                                                work_left, worker_id)
from theseus_cli.progress import seconds
from theseus_cli.training.faults import Interrupted

if TYPE_CHECKING:
    from theseus_cli.pipelines.search.pipeline import Candidate, Search


def open_study(search: "Search") -> optuna.Study:
    """Create the study (and, on the grid, queue its candidates) or load it: creation is atomic in the storage, so
    of several workers starting together exactly one creates and queues."""
    cfg = search.search
    from theseus_cli.tasks import get_task

    direction = "maximize" if get_task(search.base.task).higher_is_better else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"study_name": f"{STUDY_NAME}-{search.digest[:12]}", "direction": direction,
              "sampler": make_sampler(cfg.sampler, cfg.seed),
              "pruner": make_pruner(cfg.budget.pruner, cfg.budget.reduction_factor, len(search.fractions))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(search.options.storage, search.out)
        try:
            study = optuna.create_study(storage=storage, **kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(storage=storage, study_name=kwargs["study_name"], sampler=kwargs["sampler"],
                                      pruner=kwargs["pruner"])
            if cfg.sampler == "grid":
                wait_until_queued(study)
        else:
            if cfg.sampler == "grid":
                enqueue_all(study, [c.label for c in search.candidates], cfg.seed)
    return study


def spent(study: optuna.Study) -> float:
    """Full-conversion equivalents the study's rungs have run (nominal budget fractions)."""
    return sum(float(t.user_attrs.get("cost", 0.0)) for t in study.get_trials(deepcopy=False))


class Objective:
    """Optuna's objective: one trial, rung after rung."""

    def __init__(self, search: "Search", study: optuna.Study):
        self.search, self.study = search, study
        self.by_label = {c.label: c for c in search.candidates}

    def __call__(self, trial: optuna.Trial) -> float:
        s = self.search
        if s.search.sampler == "grid" and not from_queue(trial):  # the queue ran dry while this worker asked
            trial.set_user_attr("idle", True)
            self.study.stop()
            raise optuna.TrialPruned("no queued candidate left")
        cand = self.by_label[trial.suggest_categorical("candidate", list(self.by_label))]
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("architecture", cand.arch.label)
        trial.set_user_attr("method", cand.method + (f"({cand.similarity})" if cand.similarity else ""))
        cost, value = 0.0, float("nan")
        for rung, fraction in enumerate(s.fractions):
            if spent(self.study) + fraction > s.search.budget.max_cost + 1e-9:
                trial.set_user_attr("stopped", "cost cap")
                raise optuna.TrialPruned(f"budget.max_cost {s.search.budget.max_cost:g} reached")
            report = self.run_rung(cand, rung, fraction)
            cost += fraction
            rungs = list(trial.user_attrs.get("rungs", []))
            rungs.append(rung_entry(report, fraction))
            trial.set_user_attr("rungs", rungs)
            trial.set_user_attr("cost", cost)
            value = report["metric"]["target"]
            if rung < len(s.fractions) - 1:
                trial.report(value, rung_step(rung, s.search.budget.reduction_factor))
                if trial.should_prune():
                    trial.set_user_attr("stopped", f"pruned after rung {rung} ({fraction:g} of the budget)")
                    raise optuna.TrialPruned()
        trial.set_user_attr("full_budget", True)
        return value

    def run_rung(self, cand: "Candidate", rung: int, fraction: float) -> dict[str, Any]:
        from theseus_cli.pipelines.convert import ConvertOptions, run_conversion

        s = self.search
        recipe = s.trial_recipe(cand, fraction)
        s.progress.log(f"trial: {cand.label}: rung {rung + 1}/{len(s.fractions)} ({fraction:g} of the budget)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TheseusWarning)  # said once by the search, not by every trial
            return run_conversion(recipe, s.trial_dir(cand, rung), ConvertOptions(
                device=s.options.device, resume=True, latency=False, progress=s.trial_progress),
                session=s.trial_session)


def rung_entry(report: dict[str, Any], fraction: float) -> dict[str, Any]:
    steps = report["steps"]
    return {"fraction": fraction, "metric": report["metric"]["target"], "retention": report["metric"]["retention"],
            "steps": int(steps["alignment"] + steps["finetune"]), "seconds": report["wall_time"]["total"]}


def trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    rungs = trial.user_attrs.get("rungs", [])
    last = rungs[-1] if rungs else {}
    return {"number": trial.number, "state": trial.state.name.lower(), "candidate": trial.params.get("candidate"),
            "architecture": trial.user_attrs.get("architecture"), "method": trial.user_attrs.get("method"),
            "budget_fraction": last.get("fraction"), "validation_metric": last.get("metric"),
            "validation_retention": last.get("retention"), "rungs": rungs,
            "full_budget": bool(trial.user_attrs.get("full_budget")), "stopped": trial.user_attrs.get("stopped"),
            "cost": trial.user_attrs.get("cost", 0.0), "worker": trial.user_attrs.get("worker"),
            "retry_of": trial.user_attrs.get("retry_of"),
            "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start else None}


def explore(search: "Search") -> None:
    """Run trials until the study has none left for this worker (see the module docstring)."""
    if not search.candidates:
        search.study = None
        return
    study = search.study = open_study(search)
    labels, grid = [c.label for c in search.candidates], search.search.sampler == "grid"
    retried = recover(study, exclusive=search.options.storage is None)
    done = [t for t in study.get_trials(deepcopy=False)
            if counted(t) and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if done or retried:
        search.progress.log(f"phase 2: resumed: {len(done)} finished trials kept"
                            + (f", trial{'s' if len(retried) > 1 else ''} {', '.join(map(str, retried))} of a "
                               "stopped worker run again" if retried else ""))
    limit = search.search.budget.trials
    budget = search.search.budget
    search.progress.log(f"phase 2: {len(labels)} candidates, rungs at {', '.join(f'{f:g}' for f in search.fractions)} "
                        f"of the budget, {budget.pruner} (η = {budget.reduction_factor}), at most "
                        f"{budget.max_cost:g} full conversions")
    def finished(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not counted(trial):
            return
        row = trial_row(trial)
        metric = row["validation_metric"]
        text = f"{metric:.4f}" if metric is not None else "—"
        search.progress.log(f"trial {trial.number} {row['state']}: {row['candidate']}: validation {text} at "
                            f"{row['budget_fraction'] or 0:g} of the budget"
                            + (f" ({row['stopped']})" if row["stopped"] else "")
                            + (f", {seconds(row['seconds'])}" if row["seconds"] else ""))
        if search.options.on_trial is not None:
            search.options.on_trial(row)
        if not work_left(study_, grid, limit) or spent(study_) + search.fractions[0] > budget.max_cost + 1e-9:
            study_.stop()

    if not work_left(study, grid, limit):
        return
    try:
        study.optimize(Objective(search, study), callbacks=[finished], n_trials=limit, gc_after_trial=False)
    except Interrupted as stop:
        raise Interrupted(f"{stop.message.split(';')[0]}; rerun the same command with --resume to continue the "
                          "search (finished trials are kept)", stop.exit_code - 128) from None
