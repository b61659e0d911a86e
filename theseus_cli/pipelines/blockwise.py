"""The alignment phase under ``schedule.kind: blockwise``: one guide pass to disk, then each stage alone.

:func:`align_blockwise` is what :meth:`theseus_cli.pipelines.convert.Conversion.align` runs for this schedule:

1. **guide pass** — rank 0 runs the guide once over the alignment set and stores every aligned block's inputs and
   outputs in ``OUT/.blocks/`` (:class:`~theseus_cli.training.block_store.BlockStore`; a complete store of the same
   run is reused on ``--resume``); the other ranks wait, then read the same files;
2. **stages** — each stage introduces its replacements and trains them on its blocks alone, read back from the
   store (the guide is not run again). Each stage has its own batch order (seeded by its index), so stages do not
   depend on each other: after each one, its trained modules' state is checkpointed on its own
   (``OUT/.resume/blocks/``), and a resumed run restores every finished stage and trains the rest. Under
   ``torchrun`` each stage is data-parallel as in the other schedules (each rank runs its shard of every batch).

Nothing is kept in memory but the models and one batch of one block's rows; the store's size and the pass's time
are in the report (``alignment_store``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import asdict
from typing import Any

import torch

from theseus_cli.errors import OutputError
from theseus_cli.training import align_stage
from theseus_cli.training import resume as resume_stages
from theseus_cli.training.block_store import BLOCKS_DIR, BlockStore
from theseus_cli.training.distributed import current_dist
from theseus_cli.training.memory import release_freed_memory
from theseus_cli.training.runtime import current_runtime


def block_store(conv) -> BlockStore:
    """Fill (rank 0) or open (the other ranks, once rank 0 is done) the run's block store."""
    plan, data, recipe = conv.plan_, conv.session.data, conv.recipe
    points = sorted({p for s in plan.stages for p in s.aligned}, key=plan.align_order.__getitem__)
    store = BlockStore(conv.out / BLOCKS_DIR, data.x_train.shape[0], points)
    dist, rt = current_dist(), current_runtime(conv.session.device)
    limit = recipe.schedule.max_store_gb
    if dist.main:
        store.write(conv.guide, data.x_train, recipe.data.eval_batch_size, conv.session.device, rt.autocast,
                    conv.fingerprint, int(limit * 2**30) if limit else None, conv.progress)
    dist.barrier()
    if not dist.main and not store.load(conv.fingerprint):
        raise OutputError(f"{store.root}: rank 0's block store is not readable from this process; under torchrun "
                          "the output directory must be on a file system every rank shares")
    conv.progress.log(f"guide pass: {len(points)} blocks' inputs on disk, {store.bytes / 2**20:,.0f} MiB "
                      f"({store.bytes / max(store.n, 1) / 2**10:,.1f} KiB per sample), {store.seconds:.0f} s")
    return store


def align_blockwise(conv, job) -> list[dict[str, Any]]:
    """Every stage of the blockwise schedule, each from the store alone; the stages' results in order."""
    store = block_store(conv)
    conv.results.align_store = store.summary()
    job = dataclasses.replace(job, cache=store)
    plan, results, started = conv.plan_, [], time.perf_counter()
    first = None
    for index, stage in enumerate(plan.stages):
        torch.manual_seed(conv.seeds.stage(index))
        conv.introduce(conv.target, stage)
        saved = resume_stages.load_block_stage(conv.out, index, conv.fingerprint) if conv.options.resume else None
        if saved is not None:
            _restore(conv.target, stage.trained, saved["state"])
            results.append(saved["result"])
            continue
        cfg = conv.recipe.align.for_stage(index + 1, stage.introduced, conv._matches)
        generator = torch.Generator().manual_seed(conv.seeds.stage(index))  # its own order: stages are independent
        result = align_stage(index, conv.guide, conv.target, stage, conv.session.data.x_train,
                             dataclasses.replace(job, cfg=cfg, generator=generator))
        results.append(asdict(result))
        release_freed_memory()  # the stage's optimiser state and activations, freed: back to the OS
        conv._log_stage(result, index, len(plan.stages), time.perf_counter() - started, first)
        first = first if first is not None else index
        if conv.main:
            modules = {p: conv.target.get_submodule(p) for p in stage.trained}
            resume_stages.save_block_stage(conv.out, index, modules, results[-1], conv.fingerprint)
            conv._save_legs()
    return results


def _restore(target: torch.nn.Module, trained: list[str], state: dict[str, torch.Tensor]) -> None:
    for path in trained:
        prefix = f"{path}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        target.get_submodule(path).load_state_dict(own)


def remove_store(out) -> None:
    """The store is scratch space of a running conversion: gone once its report is written."""
    shutil.rmtree(out / BLOCKS_DIR, ignore_errors=True)
