"""Phase 2 of a search: the feasible candidates' short conversions, ranked on the validation split, the best
promoted rung by rung to the full budget by Optuna's pruner (:mod:`theseus_cli.pipelines.search.study`).

A trial is one candidate. At rung ``r`` it runs a normal conversion (``convert``'s pipeline, into
``DIR/trials/<candidate>/r<r>``) at ``budget.fractions()[r]`` of the base recipe's alignment and fine-tuning,
reports the validation metric, and continues only if the pruner keeps it. On the grid (the default) the rungs are
synchronous (:mod:`theseus_cli.pipelines.search.halving`); Optuna's ``optimize`` loop with its asynchronous pruner
runs the other samplers and hyperband. Before each rung the steps the study has spent (by every worker) plus the
rung's planned steps are checked against ``budget.max_cost`` (:mod:`theseus_cli.pipelines.search.cost`); a rung
that would pass it is not run and the trial ends pruned ("cost cap").
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from theseus_cli.errors import TheseusWarning
from theseus_cli.pipelines.search.cost import fits
from theseus_cli.pipelines.search.halving import GridHalving
from theseus_cli.pipelines.search.study import (STUDY_NAME, counted, enqueue_all, from_queue, make_pruner,
                                                make_sampler, open_storage, recover, rung_step, tag_trial,
                                                wait_until_queued, work_left)
from theseus_cli.progress import seconds
from theseus_cli.training.faults import Interrupted

if TYPE_CHECKING:
    from theseus_cli.pipelines.search.pipeline import Candidate, Search


def open_study(search: "Search") -> optuna.Study:
    """Create the study (and, on the grid, queue its candidates) or load it: creation is atomic in the storage, so
    of several workers starting together exactly one creates and queues."""
    cfg = search.search
    grid = cfg.sampler == "grid"
    direction = "maximize" if search.higher_is_better else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"study_name": f"{STUDY_NAME}-{search.digest[:12]}", "direction": direction,
              "sampler": make_sampler(cfg.sampler, cfg.seed),
              "pruner": make_pruner(cfg.budget.pruner, cfg.budget.reduction_factor, len(search.fractions), grid,
                                    search.higher_is_better)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = search.storage = open_storage(search.options.storage, search.out)
        try:
            study = optuna.create_study(storage=storage, **kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(storage=storage, study_name=kwargs["study_name"], sampler=kwargs["sampler"],
                                      pruner=kwargs["pruner"])
            if grid:
                wait_until_queued(study)
        else:
            if grid:
                enqueue_all(study, [c.label for c in search.candidates], cfg.seed)
    return study


def run_rung(search: "Search", trial: optuna.Trial, cand: "Candidate", rung: int) -> float:
    """One rung of ``trial``: a normal conversion into ``DIR/trials/<candidate>/r<rung>`` (resumed if it ran
    before), recorded on the trial (its measured steps, the study's cost) and reported to the pruner."""
    from theseus_cli.pipelines.convert import ConvertOptions, run_conversion

    s, fraction = search, search.fractions[rung]
    recipe = s.trial_recipe(cand, fraction)
    s.progress.log(f"trial: {cand.label}: rung {rung + 1}/{len(s.fractions)} ({fraction:g} of the budget)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TheseusWarning)  # said once by the search, not by every trial
        report = run_conversion(recipe, s.trial_dir(cand, rung), ConvertOptions(
            device=s.options.device, resume=True, latency=False, progress=s.trial_progress), session=s.trial_session)
    rungs = list(trial.user_attrs.get("rungs", []))
    rungs.append({**rung_entry(report, fraction), "candidate_key": cand.key})
    trial.set_user_attr("rungs", rungs)
    trial.set_user_attr("cost", sum(r["steps"] for r in rungs) / s.full_steps)
    value = report["metric"]["target"]
    trial.report(value, rung_step(rung, s.search.budget.reduction_factor))
    s.progress.log(f"trial {trial.number}: {cand.label}: validation {value:.4f} at {fraction:g} of the budget "
                   f"({rungs[-1]['steps']:,} steps; the search has spent {s.spent_steps() / s.full_steps:.2f} of "
                   f"{s.search.budget.max_cost:g} full conversions)")
    return value


class Objective:
    """Optuna's objective for the samplers that propose candidates one at a time (tpe, random) and for hyperband:
    one trial, rung after rung, Optuna's asynchronous pruner deciding after each."""

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
        tag_trial(trial, cand)
        value = float("nan")
        for rung, fraction in enumerate(s.fractions):
            if not fits(s.spent_steps(), s.planned(cand, fraction), s.cap_steps):
                trial.set_user_attr("stopped", "cost cap")
                raise optuna.TrialPruned(f"budget.max_cost {s.search.budget.max_cost:g} reached")
            value = run_rung(s, trial, cand, rung)
            if rung < len(s.fractions) - 1 and trial.should_prune():
                trial.set_user_attr("stopped", f"pruned after rung {rung} ({fraction:g} of the budget)")
                raise optuna.TrialPruned()
        trial.set_user_attr("full_budget", True)
        return value


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
            "retry_of": trial.user_attrs.get("retry_of"), "incumbent": bool(trial.user_attrs.get("incumbent")),
            "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start else None}


def explore(search: "Search") -> None:
    """Run trials until the study has none left for this worker (see the module docstring)."""
    if not search.candidates:
        search.study = None
        return
    study = search.study = open_study(search)
    cfg, grid = search.search, search.search.sampler == "grid"
    retried = recover(study, exclusive=search.options.storage is None)
    done = [t for t in study.get_trials(deepcopy=False)
            if counted(t) and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if done or retried:
        search.progress.log(f"phase 2: resumed: {len(done)} finished trials kept"
                            + (f", trial{'s' if len(retried) > 1 else ''} {', '.join(map(str, retried))} of a "
                               "stopped worker run again" if retried else ""))
    budget = cfg.budget
    search.progress.log(f"phase 2: {len(search.candidates)} candidates, rungs at "
                        f"{', '.join(f'{f:g}' for f in search.fractions)} of the budget, {budget.pruner} (η = "
                        f"{budget.reduction_factor}{', synchronous' if grid and budget.pruner != 'hyperband' else ''}), "
                        f"at most {budget.max_cost:g} full conversions ({search.cap_steps:,.0f} gradient steps; one "
                        f"run of the base recipe: {search.full_steps:,})")

    def told(trial: optuna.trial.FrozenTrial) -> None:
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

    try:
        if grid and budget.pruner != "hyperband":
            GridHalving(search, study, told, run_rung).run()
            return
        if not work_left(study, grid, budget.trials):
            return

        def finished(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            told(trial)
            cheapest = min(search.planned(c, search.fractions[0]) for c in search.candidates)
            if not work_left(study_, grid, budget.trials) or not fits(search.spent_steps(), cheapest, search.cap_steps):
                study_.stop()

        study.optimize(Objective(search, study), callbacks=[finished], n_trials=budget.trials, gc_after_trial=False)
    except Interrupted as stop:
        raise Interrupted(f"{stop.message.split(';')[0]}; rerun the same command with --resume to continue the "
                          "search (finished trials are kept)", stop.exit_code - 128) from None
