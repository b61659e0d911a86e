"""What a finished :class:`~theseus_cli.pipelines.convert.Conversion` writes: the target with its typed metadata,
the alignment plot, and the report (last: its presence marks a finished run)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from theseus_cli import __version__
from theseus_cli.artifacts import PLOT_FILE, REPORT_FILE, TARGET_FILE, save_target, versions, write_json
from theseus_cli.deploy.gates import evaluate_gates
from theseus_cli.models.hf import portable_spec
from theseus_cli.pipelines.checks import plan_report, retention
from theseus_cli.pipelines.plots import plot_alignment
from theseus_cli.target_meta import ArchSpec, Normalization, TargetMeta
from theseus_cli.training.distributed import current_dist
from theseus_cli.training.runtime import align_batch_size

if TYPE_CHECKING:
    from theseus_cli.pipelines.convert import Conversion


def target_meta(conv: "Conversion") -> TargetMeta:
    """The metadata that rebuilds the target from its file alone. ``hf:`` directories are recorded as the
    config-built models they hold, so the file rebuilds without them."""
    return meta_for(conv.recipe, conv.session, conv.plan_)


def meta_for(recipe, session, plan) -> TargetMeta:
    """:func:`target_meta` of any plan on a session (``theseus search`` exports candidates before training them)."""
    data = session.data
    guide_arch, guide_kwargs, tokenizer = portable_spec(recipe.guide.arch, recipe.guide.kwargs, data.tokenizer)
    target = None
    if recipe.target is not None:
        arch, kwargs, _ = portable_spec(recipe.target.arch, recipe.target.kwargs, None)
        target = ArchSpec(arch=arch, kwargs=kwargs)
    guide = ArchSpec(arch=guide_arch, kwargs=guide_kwargs, head=session.head)
    return TargetMeta(guide=guide, task=recipe.task, target=target,
                      entries=[asdict(e) for e in plan.entries], input_shape=list(plan.input_shape),
                      num_classes=data.num_classes,
                      normalization=Normalization(mean=data.mean, std=data.std) if data.mean else None,
                      tokenizer=tokenizer, recipe=recipe.resolved(), recipe_hash=recipe.digest(),
                      theseus_version=__version__)


def conversion_report(conv: "Conversion") -> dict[str, Any]:
    recipe, session, r, task, dist = conv.recipe, conv.session, conv.results, conv.task, current_dist()
    sim, runs, dev = recipe.similarity, conv.baselines_ or {}, session.device
    base = runs.get("scratch")  # report["baseline"] and metric.baseline keep meaning the from-scratch one
    return {
        "versions": versions(), "seed": recipe.seed, "device": str(dev), "warnings": conv.warnings,
        "runtime": {**conv.rt.summary(), "align_batch_size": align_batch_size(recipe, dev)},
        "distributed": {"world_size": dist.world, "backend": torch.distributed.get_backend() if dist.enabled else None},
        "recipe": recipe.resolved(), "recipe_hash": recipe.digest(), "guide": session.guide_info,
        "data": session.data.summary(), "plan": plan_report(conv.plan_, recipe),
        "params": {"guide": conv.plan_.guide_params, "target": conv.plan_.target_params}, "stages": r.stages,
        "similarity": {"optimised": sim.kind, "heldout_samples": int(conv.heldout.shape[0]), "mknn_k": sim.k,
                       "after_alignment": r.sim_after_align, "after_finetune": r.sim_after_ft},
        "guide_cache": conv.cache.summary() if conv.cache is not None else None,
        "alignment_store": r.align_store,
        "bn_recalibration": {"enabled": recipe.bn_recalibration.enabled, "layers": r.bn_layers},
        "task": recipe.task,
        "metric": {"name": task.metric, "higher_is_better": task.higher_is_better, "guide": r.m_guide,
                   "target_after_alignment": r.m_aligned, "target": r.m_target,
                   "baseline": base[task.metric] if base else None,
                   "baselines": {run: b[task.metric] for run, b in runs.items()},
                   "retention": retention(task, r.m_guide, r.m_target)},
        "steps": {"alignment": conv.align_steps, "finetune": conv.task_steps()[0],
                  "baseline": next(iter(runs.values()))["steps"] if runs else None},
        "alignment_objective": recipe.schedule.objective,
        "finetune": r.finetune, "baseline": base, "baselines": runs, "deployment": conv.deployment,
        "wall_time": conv.wall_time(),
        "files": {"target": TARGET_FILE, "report": REPORT_FILE, "plot": PLOT_FILE},
    }


def write_outputs(conv: "Conversion") -> dict[str, Any]:
    out, recipe = conv.out, conv.recipe
    save_target(out / TARGET_FILE, conv.target.cpu(), target_meta(conv))
    report = conversion_report(conv)
    replaced = recipe.target.arch if recipe.target else ", ".join(sorted({e.replacement for e in conv.plan_.entries}))
    objective = recipe.similarity.kind if recipe.schedule.objective == "similarity" else "distill"
    plot_alignment(out / PLOT_FILE, conv.results.stages, conv.results.sim_after_align, objective,
                   f"{recipe.guide.arch} → {replaced}")
    if conv.options.gates.any:
        report["gates"] = evaluate_gates(conv.options.gates, report)
    report["wall_time"] = conv.wall_time()
    write_json(out / REPORT_FILE, report)  # last: its presence marks a finished run
    return report
