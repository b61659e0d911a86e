"""A conversion's phases under ``runtime.fsdp`` (:mod:`theseus_cli.training.fsdp` says what sharding changes).

:class:`~theseus_cli.pipelines.convert.Conversion` calls these at its seams: :func:`prepare_sharded` once the plan is made
(every replacement introduced, then guide and target sharded), :func:`save_sharded_stage` / :func:`restore_sharded_stage` and
:func:`save_sharded_phase` / :func:`restore_sharded_phase` for its resumable checkpoints, and :func:`unshard` before rank 0 profiles
and writes. With one process (``runtime.fsdp`` without ``torchrun``) the replacements are still introduced up front,
the rest is the ordinary path: the run a sharded one is compared with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from theseus_cli.training import resume as resume_stages
from theseus_cli.training.distributed import current_dist
from theseus_cli.training.fsdp import gathered, load_sharded, save_sharded, shard_by_block, skeleton


def prepare_sharded(conv) -> None:
    """Every stage's replacements, each under its stage's seed; then, under torchrun, unsharded skeletons for rank 0
    (parameters on ``meta``) and guide and target sharded by block."""
    for index, stage in enumerate(conv.plan_.stages):
        torch.manual_seed(conv.seeds.stage(index))
        conv.introduce(conv.target, stage)
    conv.introduce = lambda target, stage: None  # nothing left to introduce
    conv.plain = (None, None)
    if current_dist().sharded:
        if current_dist().main:
            conv.plain = (skeleton(conv.guide), skeleton(conv.target))
        shard_by_block(conv.guide)
        shard_by_block(conv.target)


def _folder(out: Path, name: str) -> Path:
    return out / resume_stages.RESUME_DIR / f"sharded-{name}"


def save_sharded_stage(conv, stages: list, generator: torch.Generator) -> None:
    """After a stage: the target's shards (every rank) into a folder named by the stages done, then rank 0's figures
    naming it; the folder of the stage before is removed only then, so a kill leaves a consistent pair."""
    done = len(stages)
    save_sharded(conv.target, _folder(conv.out, f"stages-{done}"))
    if conv.main:
        resume_stages.save_stages(conv.out, None, stages, generator, conv.fingerprint)
        shutil.rmtree(_folder(conv.out, f"stages-{done - 1}"), ignore_errors=True)
    current_dist().barrier()


def restore_sharded_stage(conv, saved: dict) -> None:
    load_sharded(conv.target, _folder(conv.out, f"stages-{len(saved['stages'])}"))


def save_sharded_phase(conv, phase: str, results: dict) -> None:
    save_sharded(conv.target, _folder(conv.out, phase))
    if conv.main:
        resume_stages.save_phase(conv.out, phase, None, results, conv.fingerprint)
    current_dist().barrier()


def restore_sharded_phase(conv, done: dict) -> None:
    load_sharded(conv.target, _folder(conv.out, done["phase"]))


def unshard(conv) -> None:
    """The trained target's and the guide's full weights gathered into rank 0's skeletons (every rank takes part);
    rank 0 then profiles and writes them as any run's."""
    plain_guide, plain_target = conv.plain
    conv.guide = gathered(conv.guide, plain_guide)
    conv.target = gathered(conv.target, plain_target)
