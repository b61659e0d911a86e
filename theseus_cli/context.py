"""The state of the run in progress, in one place: which runtime and process group it uses, whether the user
trusted pickled checkpoints, and the stop signals it has received.

Library calls are reentrant (a test may run two conversions in one process, a notebook may nest a call
inside another), so this state is a :class:`contextvars.ContextVar` holding one immutable
:class:`RunState`; :func:`changed` sets fields for the duration of a ``with`` block and puts the previous
state back afterwards. Each subsystem reads its field through its own accessor
(:func:`theseus_cli.training.runtime.current`, :func:`theseus_cli.training.distributed.current_dist`,
:func:`theseus_cli.models.checkpoint.pickles_trusted`, :func:`theseus_cli.training.faults.check_stop`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Iterator


@dataclass(frozen=True)
class RunState:
    runtime: Any = None  # training.runtime.Runtime chosen for the run; None: plain fp32 on the device asked for
    dist: Any = None  # training.distributed.Dist of a torchrun job; None: a single process
    trust_pickles: bool = False  # --trust-checkpoint: unpickle .pt files in full (weights_only=False)
    stop_signals: list[int] | None = None  # graceful_stop's handler appends the signals received, in order


_STATE: ContextVar[RunState] = ContextVar("theseus_run_state", default=RunState())


def run_state() -> RunState:
    return _STATE.get()


@contextmanager
def changed(**fields: Any) -> Iterator[RunState]:
    """Within this block, the run state has ``fields`` replaced (the rest as it was)."""
    token = _STATE.set(replace(_STATE.get(), **fields))
    try:
        yield _STATE.get()
    finally:
        _STATE.reset(token)
