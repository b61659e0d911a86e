"""Phase 2's bookkeeping in Optuna: the study, its storage, its sampler and pruner, and what a killed worker left.

* **Storage.** By default the study is a journal file in the output directory (``DIR/study.journal``, Optuna's
  ``JournalFileBackend``: safe for several processes on one machine, nothing to install). ``--storage URL`` names
  any storage Optuna opens: an RDB URL (``postgresql://…``, ``mysql://…``, ``sqlite:///…``) or
  ``journal:PATH`` for a journal file elsewhere. Several processes, on one machine or several sharing the output
  directory, that run ``theseus search`` with the same search file, ``--out`` and ``--storage`` are workers of
  one study: Optuna hands each trial to one of them. That is Optuna's own mechanism; theseus schedules nothing.
* **Sampler.** ``grid`` (the default): the worker that creates the study enqueues every feasible candidate once,
  in a seeded random order (``Study.enqueue_trial``); workers take queued trials one at a time from the storage,
  so no candidate runs twice, however many workers there are. ``tpe`` and ``random`` are Optuna's samplers over
  the candidates as one categorical parameter, for spaces too large to try whole (set ``budget.trials``); they
  may propose a candidate twice.
* **Pruner.** ``successive-halving`` or ``hyperband``: a trial runs rung after rung of the budget
  (``budget.fractions()``) and reports its validation metric at each; the pruner stops the ones that are not in
  the best ``1/η`` of their rung. On the grid, successive halving is synchronous (:class:`RungPruner`: every
  candidate runs the first rung before any is promoted); with ``tpe``/``random`` and with ``hyperband`` the
  pruners are Optuna's asynchronous ones, which compare a trial with those that reported before it. Each rung is a fresh, shorter conversion (a cosine
  schedule cut short is not the start of a longer one), so a promoted trial pays for each rung it ran.
* **A killed worker.** Its trial stays RUNNING in the storage. ``--resume`` of a search with its own study (no
  ``--storage``: the process holds the output directory's lock, so no other worker exists) marks every RUNNING
  trial FAIL and enqueues its candidate again; a worker of a shared study does so for RUNNING trials whose worker
  process on this machine (host and pid, recorded on the trial) is gone; with an RDB storage, Optuna's heartbeat does the same for workers on other machines
  (``RetryFailedTrialCallback``). The retried trial's conversion continues from its last finished alignment stage
  (each rung is a normal run directory, resumed with ``convert``'s machinery).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

from theseus_cli.errors import OutputError, UsageError

STUDY_NAME = "theseus-search"
JOURNAL_FILE = "study.journal"
HEARTBEAT_S = 30


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def tag_trial(trial: optuna.Trial, cand, incumbent: bool = False) -> None:
    """What a trial records of itself when a worker opens it: the worker, and its candidate's architecture and
    method (the columns of ``search.json``'s trials)."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("architecture", cand.arch.label)
    trial.set_user_attr("method", cand.method + (f"({cand.similarity})" if cand.similarity else ""))
    if incumbent:
        trial.set_user_attr("incumbent", True)


def open_storage(url: str | None, out: Path):
    """Optuna's storage for ``url`` (None: the journal file in ``out``)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:"):
        path = out / JOURNAL_FILE if url is None else Path(url[len("journal:"):])
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise OutputError(f"{path}: cannot open the study journal: {exc.strerror or exc}") from None
    try:
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                          failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=3))
    except Exception as exc:  # noqa: BLE001 — a bad URL, a missing driver, a server that does not answer
        raise UsageError(f"--storage {url!r}: Optuna cannot open it: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}") from None


def make_sampler(kind: str, seed: int):
    """Optuna's sampler for ``kind`` (grid: a random sampler that is never asked, every trial being queued)."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def enqueue_all(study: optuna.Study, candidates: list[str], seed: int) -> None:
    """Grid: every candidate queued once, in a seeded random order; then the study says it is ready (workers that
    join wait for that, so none of them finds an empty queue while it is being filled)."""
    import random

    order = list(candidates)
    random.Random(seed).shuffle(order)
    for label in order:
        study.enqueue_trial({"candidate": label}, user_attrs={"queued": True})
    study.set_user_attr("queued", len(order))


def wait_until_queued(study: optuna.Study, timeout_s: float = 600.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while "queued" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise OutputError(f"study {study.study_name}: the worker that created it never finished queueing its "
                              "candidates; rerun with --resume")
        time.sleep(0.5)


class RungPruner(optuna.pruners.BasePruner):
    """Synchronous successive halving: at a rung, a trial is kept when fewer than ``max(1, n // η)`` of the ``n``
    values reported at that rung by the study's trials (failed ones left out: their retry reports again; the
    incumbent left out: it is promoted anyway, :mod:`theseus_cli.pipelines.search.incumbent`) are better than its
    own; ties are all kept.

    Optuna's own :class:`~optuna.pruners.SuccessiveHalvingPruner` is asynchronous: it compares a trial with the
    trials that happened to report at the rung before it, so the first trials of a grid are promoted with almost no
    competition, and under a cost cap they spend the budget before most candidates were tried at all. The grid
    search therefore asks for this pruner's verdict only once every candidate has reported at the rung
    (:mod:`theseus_cli.pipelines.search.halving`); with all values in, every worker reaches the same verdicts.
    """

    def __init__(self, reduction_factor: int, higher_is_better: bool):
        self.reduction_factor, self.sign = reduction_factor, 1.0 if higher_is_better else -1.0

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        mine = trial.intermediate_values[step]
        values = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and counted(t) and t.state != TrialState.FAIL
                  and step in t.intermediate_values and not t.user_attrs.get("incumbent")] + [mine]
        keep = max(1, len(values) // self.reduction_factor)
        return sum(self.sign * v > self.sign * mine for v in values) >= keep


def make_pruner(kind: str, reduction_factor: int, rungs: int, grid: bool = False, higher_is_better: bool = True):
    """The grid's synchronous :class:`RungPruner` for ``successive-halving``; Optuna's asynchronous pruners for a
    sampler that proposes candidates one at a time, and for ``hyperband``."""
    top = reduction_factor ** (rungs - 1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=top, reduction_factor=reduction_factor)
    if grid:
        return RungPruner(reduction_factor, higher_is_better)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor)


def rung_step(rung: int, reduction_factor: int) -> int:
    """The resource a rung reports at: η^rung (rung 0 at 1, the pruner's ``min_resource``)."""
    return reduction_factor ** rung


def _alive(worker: str | None) -> bool | None:
    """Whether the worker ``host:pid`` still runs (None: on another host, which this process cannot see)."""
    if not worker or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study: optuna.Study, exclusive: bool) -> list[int]:
    """RUNNING trials of workers that are gone → FAIL, and their candidate enqueued again (once per candidate); FAIL
    trials whose candidate never finished are enqueued again too. Returns the trial numbers. ``exclusive``: this
    process holds the output directory's lock (no ``--storage``), so no other worker can be running any trial."""
    retried, pending = [], set()
    gone = (lambda t: True) if exclusive else (lambda t: _alive(t.user_attrs.get("worker")) is False)
    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    done = {t.params.get("candidate") for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    for t in trials:
        if t.state == TrialState.WAITING or (t.state == TrialState.RUNNING and not gone(t)):
            pending.add(t.params.get("candidate") or t.system_attrs.get("fixed_params", {}).get("candidate"))
    for t in trials:
        if t.state == TrialState.RUNNING and gone(t):
            study.tell(t.number, state=TrialState.FAIL)
            t_state = TrialState.FAIL
        else:
            t_state = t.state
        candidate = t.params.get("candidate")
        if t_state == TrialState.FAIL and candidate and candidate not in done and candidate not in pending:
            study.enqueue_trial({"candidate": candidate}, user_attrs={"retry_of": t.number, "queued": True})
            pending.add(candidate)
            retried.append(t.number)
    return retried


def from_queue(trial: optuna.Trial) -> bool:
    return bool(trial.user_attrs.get("queued"))


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial is one of the search's (not an idle ask of a worker that found the queue empty)."""
    return not trial.user_attrs.get("idle")


def work_left(study: optuna.Study, grid: bool, limit: int | None) -> bool:
    """Whether a worker has a trial to run: a queued one (grid), or fewer than ``limit`` trials so far."""
    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    if grid:
        return any(t.state == TrialState.WAITING for t in trials)
    started = [t for t in trials if t.state != TrialState.FAIL]
    return limit is None or len(started) < limit
