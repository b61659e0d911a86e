"""Replacement schedules (the paper's section 3.2): which modules each stage introduces, trains and aligns.

Given the claimed modules in execution order, optionally grouped (``group_depth``:
modules sharing the first N components of their path form one group, e.g. a
whole ResNet layer), and taken in ``forward`` or ``reverse`` order:

* ``progressive`` — stage t introduces group t and trains/aligns every group introduced so far (Algorithm 1).
* ``sequential`` — stage t introduces group t and trains/aligns only it; earlier replacements stay frozen.
* ``independent`` — stage t trains group t alone, each module fed the *guide's* own input at that point
  and matched to the guide's output there; the pieces are assembled at the end.
* ``joint`` — one stage introduces, trains and aligns everything at once.
* ``blockwise`` — as ``independent`` (each group trained alone on the guide's input there, matched to the guide's
  output), but one pass of the guide first stores every aligned block's inputs and outputs on disk
  (:mod:`theseus_cli.training.block_store`), and each stage then runs only its own blocks, read back from there: the
  guide is not run again, a stage's memory is one block's, and the stages are independent of each other (each has its
  own batch order, and a resumed run skips the finished ones in any order). LoLCATs trains attention replacements
  this way; RADLADS aligns per layer.

A schedule is plain data (:class:`Stage` lists), printed by ``inspect`` and followed by ``convert``.

What a stage *aligns* is, for each module it trains, that module's output, or with
a rule's ``align_up`` the output of an enclosing module (a transformer block around
a replaced attention); several trained modules may share one alignment point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class Stage:
    introduced: list[str]
    trained: list[str]
    aligned: list[str]  # in execution order
    feed: Literal["hybrid", "guide", "disk"] = "hybrid"  # guide: each module gets the guide's input (independent);
    # disk: each aligned block is run alone on the guide's input there, read from the block store (blockwise)
    guide_points: list[str] | None = None  # architecture transfer: guide paths paired with ``aligned`` (None: the same paths)

    @property
    def guide_aligned(self) -> list[str]:
        return self.guide_points if self.guide_points is not None else self.aligned


def group_paths(paths: list[str], depth: int | None) -> list[list[str]]:
    """Consecutive runs of ``paths`` that share their first ``depth`` path components (None: one module each)."""
    if depth is None:
        return [[p] for p in paths]
    groups: list[list[str]] = []
    keys: list[str] = []
    for path in paths:
        key = ".".join(path.split(".")[:depth])
        if groups and keys[-1] == key:
            groups[-1].append(path)
        else:
            groups.append([path])
            keys.append(key)
    return groups


def build_stages(paths: list[str], kind: str, order: str, group_depth: int | None,
                 align_at: dict[str, str] | None = None, align_order: dict[str, int] | None = None) -> list[Stage]:
    """Stages for the claimed ``paths`` (execution order).

    ``align_at`` maps a claimed path to its alignment point (default: itself) and ``align_order``
    gives each alignment point's position in execution order (default: that of ``paths``).
    """
    align_at = align_at or {}
    point = lambda p: align_at.get(p, p)  # noqa: E731
    position = {p: i for i, p in enumerate(paths)}
    rank = align_order or {point(p): i for i, p in enumerate(paths)}
    in_order = lambda ps: sorted(ps, key=position.__getitem__)  # noqa: E731
    aligned = lambda ps: sorted({point(p) for p in ps}, key=rank.__getitem__)  # noqa: E731
    groups = group_paths(paths, group_depth)
    if order == "reverse":
        groups = groups[::-1]
    if kind == "joint":
        return [Stage(list(paths), list(paths), aligned(paths))]
    stages, seen = [], []
    for group in groups:
        seen += group
        if kind == "progressive":
            stages.append(Stage(list(group), in_order(seen), aligned(seen)))
        elif kind == "sequential":
            stages.append(Stage(list(group), list(group), aligned(group)))
        elif kind in ("independent", "blockwise"):
            stages.append(Stage(list(group), list(group), aligned(group), feed="guide" if kind == "independent" else "disk"))
        else:
            raise ValueError(f"unknown schedule {kind!r} (valid: progressive, sequential, independent, blockwise, joint)")
    return stages
