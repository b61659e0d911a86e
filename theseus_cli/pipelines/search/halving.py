"""Phase 2 on the grid: synchronous successive halving in an Optuna study, with Optuna's ask-and-tell interface.

Rung by rung:

1. **Run.** At the first rung, the worker takes queued candidates from the study one at a time (``Study.ask`` pops a
   queued trial atomically, so several workers never take the same one) and runs each candidate's first rung. At a
   later rung, it runs its promoted trials' next rung, the best first. Each trial stays open (RUNNING) between
   rungs; it reports its validation metric at every rung (``Trial.report``).
2. **Wait.** Until every trial of the study has reported at the rung or ended: the other workers' too. A trial left
   RUNNING by a worker that is gone is failed and its candidate queued again
   (:func:`theseus_cli.pipelines.search.study.recover`; Optuna's heartbeat for an RDB storage); whichever worker
   takes the retry catches it up, resuming its finished rung directories.
3. **Decide.** :class:`~theseus_cli.pipelines.search.study.RungPruner` keeps the best ``1/η``; the others end
   PRUNED. At the last rung the trials end COMPLETE with their full-budget metric.

**Cost cap** (:mod:`theseus_cli.pipelines.search.cost`). A rung starts only if the steps spent so far plus its
planned steps fit under ``budget.max_cost`` full conversions, less a **reserve**: the planned steps of one trial of
the most expensive candidate at each later rung, and the incumbent's
(:mod:`theseus_cli.pipelines.search.incumbent`). So the first rung can never spend the budget that the winner
needs to reach the full budget; candidates the first rung cannot afford end PRUNED ("cost cap: not run") and the
result counts them.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Optional

import optuna
from optuna.trial import TrialState

from theseus_cli.pipelines.search.cost import fits
from theseus_cli.pipelines.search.study import counted, from_queue, recover, rung_step, tag_trial

if TYPE_CHECKING:
    from theseus_cli.pipelines.search.pipeline import Candidate, Search

POLL_S = 1.0  # how often a worker that waits for the others looks at the study again


class Heartbeat:
    """Optuna's heartbeat for the trials a worker holds open (an RDB storage with ``heartbeat_interval``): with
    ask-and-tell nothing else records it, and without it another worker would fail them as stale."""

    def __init__(self, storage, trials: dict[int, Any]):
        self.storage, self.trials = storage, trials
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.interval, self.stopped = interval, threading.Event()

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            threading.Thread(target=self._beat, daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            for trial, _ in list(self.trials.values()):
                self.storage.record_heartbeat(trial._trial_id)

    def __exit__(self, *exc) -> None:
        self.stopped.set()


class GridHalving:
    """One worker's part of the grid's successive halving (see the module docstring)."""

    def __init__(self, search: "Search", study: optuna.Study, on_told, run_rung):
        self.s, self.study, self.on_told, self.run_rung = search, study, on_told, run_rung
        self.by_label = {c.label: c for c in search.candidates}
        self.fractions = search.fractions
        self.open: dict[int, tuple[optuna.Trial, "Candidate"]] = {}
        self.done_rungs: dict[int, int] = {}  # trial number → rungs it has run
        self.incumbent = search.incumbent.label if search.incumbent is not None else None
        self.reserve = [sum(max(search.planned(c, self.fractions[later]) for c in search.candidates)
                            + (search.planned(search.incumbent, self.fractions[later]) if self.incumbent else 0)
                            for later in range(r + 1, len(self.fractions))) for r in range(len(self.fractions))]
        self.heartbeat = Heartbeat(search.storage, self.open)

    def run(self) -> None:
        with self.heartbeat:
            for rung in range(len(self.fractions)):
                if rung > 0:
                    for number in self._promoted_best_first(rung - 1):
                        self._bring(number, rung)
                self._drain(rung)
                self._decide(rung)
                if not self.open and not self._others_open():
                    return

    # ------------------------------------------------------------------ steps

    def _take(self) -> Optional[int]:
        """A queued trial of the study, opened by this worker (None: the queue is empty)."""
        if not any(t.state == TrialState.WAITING for t in self.study.get_trials(deepcopy=False) if counted(t)):
            return None
        trial = self.study.ask()
        if not from_queue(trial):  # another worker took the last one between the look and the ask
            trial.set_user_attr("idle", True)
            self.study.tell(trial, state=TrialState.PRUNED)
            return None
        cand = self.by_label[trial.suggest_categorical("candidate", list(self.by_label))]
        tag_trial(trial, cand, incumbent=cand.label == self.incumbent)
        self.open[trial.number], self.done_rungs[trial.number] = (trial, cand), 0
        return trial.number

    def _bring(self, number: int, upto: int) -> None:
        """Run trial ``number``'s rungs up to ``upto`` (a retry catches up on rungs its first try passed, each
        resumed from its directory and judged again)."""
        trial, cand = self.open[number]
        while self.done_rungs[number] <= upto:
            rung = self.done_rungs[number]
            if not fits(self.s.spent_steps(), self.s.planned(cand, self.fractions[rung]), self.s.cap_steps,
                        self.reserve[rung]):
                self._tell(number, TrialState.PRUNED, "cost cap: not run" if rung == 0 else
                           f"cost cap: not promoted to {self.fractions[rung]:g} of the budget")
                return
            self.run_rung(self.s, trial, cand, rung)
            self.done_rungs[number] = rung + 1
            if rung < upto and self._pruned(number, rung):
                return

    def _drain(self, rung: int) -> None:
        """Take and run queued trials until every trial of the study has reported at ``rung`` or ended."""
        while True:
            number = self._take()
            if number is not None:
                self._bring(number, rung)
                continue
            if self._everyone_at(rung):
                return
            if self.heartbeat.interval:  # workers on other machines: Optuna's heartbeat finds them
                optuna.storages.fail_stale_trials(self.study)
            recover(self.study, exclusive=False)
            time.sleep(POLL_S)

    def _everyone_at(self, rung: int) -> bool:
        step = rung_step(rung, self.s.search.budget.reduction_factor)
        for t in self.study.get_trials(deepcopy=False):
            if not counted(t) or t.state in (TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED):
                continue
            if t.state == TrialState.WAITING or step not in t.intermediate_values:
                return False
        return True

    def _others_open(self) -> bool:
        return any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in self.study.get_trials(deepcopy=False)
                   if counted(t))

    def _decide(self, rung: int) -> None:
        last = rung == len(self.fractions) - 1
        for number in [n for n, done in self.done_rungs.items() if n in self.open and done == rung + 1]:
            if last:
                trial, _ = self.open[number]
                trial.set_user_attr("full_budget", True)
                self._tell(number, TrialState.COMPLETE, None, trial.user_attrs["rungs"][-1]["metric"])
            else:
                self._pruned(number, rung)

    def _pruned(self, number: int, rung: int) -> bool:
        trial, cand = self.open[number]
        if cand.label != self.incumbent and trial.should_prune():
            self._tell(number, TrialState.PRUNED, f"pruned after rung {rung} ({self.fractions[rung]:g} of the budget)")
            return True
        return False

    def _promoted_best_first(self, rung: int) -> list[int]:
        """The promoted trials, the incumbent first (its share of the cap is reserved), then the best first."""
        sign = 1.0 if self.s.higher_is_better else -1.0
        promoted = [n for n, done in self.done_rungs.items() if n in self.open and done == rung + 1]
        return sorted(promoted, key=lambda n: (self.open[n][1].label != self.incumbent,
                                               -sign * self.open[n][0].user_attrs["rungs"][rung]["metric"]))

    def _tell(self, number: int, state: TrialState, stopped: Optional[str], value: Optional[float] = None) -> None:
        trial, _ = self.open.pop(number)
        if stopped:
            trial.set_user_attr("stopped", stopped)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.on_told(self.study.get_trials(deepcopy=False)[number])
