"""``theseus convert``: the whole Network-of-Theseus pipeline as one library call.

:func:`run_conversion` = plan → progressive alignment (Algorithm 1 of the
paper) → BatchNorm recalibration → end-to-end fine-tuning → (optionally) the
naive baseline → files. It returns the report it writes.

Stage t of the progressive schedule swaps in the replacement for the t-th
claimed module (execution order) and trains replacements 1..t jointly on the
mean of (1 − CKA) between each replaced module's output and the guide's output
at the same path; all other weights stay frozen and every BatchNorm keeps the
guide's statistics. The naive baseline is the same target architecture, every
weight freshly initialised, trained on the task for as many gradient steps as
the conversion took in all (alignment + fine-tuning), as in the paper.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from theseus_cli import __version__
from theseus_cli import memory
from theseus_cli import resume as resume_stages
from theseus_cli.arch import build_model
from theseus_cli.artifacts import PLOT_FILE, REPORT_FILE, TARGET_FILE, save_target, write_json
from theseus_cli.data import batches_per_epoch
from theseus_cli.distributed import Dist, process_group
from theseus_cli.distributed import current as current_dist
from theseus_cli.errors import DataError, MatchError, OutputError, RecipeError
from theseus_cli.faults import Interrupted, graceful_stop
from theseus_cli.gates import Gates, evaluate_gates
from theseus_cli.guide_cache import GuideCache
from theseus_cli.hf_models import portable_spec
from theseus_cli.matching import pattern_matches
from theseus_cli.plan import apply_entries, build_plan
from theseus_cli.plots import plot_alignment
from theseus_cli.profile import compare, profile_model
from theseus_cli.progress import NullProgress, Progress
from theseus_cli.recipe import Recipe
from theseus_cli.rundir import check_out_path, finished, run_directory
from theseus_cli.runtime import Runtime, align_batch_size, resolve_runtime, using
from theseus_cli.runtime import current as current_runtime
from theseus_cli.session import Session, attach_guide_embeddings, check_classes, open_session
from theseus_cli.similarity import make_loss, min_batch
from theseus_cli.tasks import Task, get_task
from theseus_cli.transfer import build_transfer_plan, inherit_weights
from theseus_cli.training import align_stage, evaluate, layer_similarity, recalibrate_batchnorm, train_task

HELDOUT_FOR_SIMILARITY = 512


def versions() -> dict[str, str]:
    import torchvision

    return {"theseus": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _task_steps(session: Session) -> tuple[int, int]:
    """(fine-tuning steps, warm-up steps) from the recipe's epochs over the labelled set."""
    ft = session.recipe.finetune
    per_epoch = batches_per_epoch(session.data.labelled.numel(), session.recipe.data.batch_size)
    return ft.epochs * per_epoch, int(round(ft.warmup_epochs * per_epoch))


def _train_on_task(model, session: Session, steps: int, warmup: int, lr: float, seed: int, label: str, progress: Progress):
    ft, data = session.recipe.finetune, session.data
    x = data.x_train[data.labelled]
    y = data.y_train[data.labelled] if data.y_train is not None else None
    return train_task(model, get_task(session.recipe.task), x, y, steps, lr, ft.weight_decay, warmup, ft.grad_clip,
                      ft.label_smoothing, session.recipe.data.batch_size, torch.Generator().manual_seed(seed),
                      session.device, label, progress)


def _evaluate(model, session: Session) -> float:
    data = session.data
    return evaluate(model, get_task(session.recipe.task), data.x_test, data.y_test, session.recipe.data.eval_batch_size,
                    session.device)


def retention(task: Task, guide: float, target: float) -> float | None:
    """How much of the guide's quality the target keeps: target/guide, or guide/target where lower is better
    (perplexity), so 1.0 is always "as good as the guide"."""
    if not guide or not target:
        return None
    return target / guide if task.higher_is_better else guide / target


def check_overrides(overrides, stages, matches) -> None:
    """A per-stage override that selects no stage is an error, like a rule that matches nothing."""
    problems = []
    for i, o in enumerate(overrides):
        if o.stage is not None and o.stage > len(stages):
            problems.append(f"align.overrides[{i}].stage: {o.stage}, but the plan has {len(stages)} stages")
        if o.match is not None and not any(matches(o.match, p) for st in stages for p in st.introduced):
            problems.append(f"align.overrides[{i}].match: {o.match!r} matches no replaced module")
    if problems:
        raise MatchError("; ".join(problems))


def _align(session: Session, guide: torch.nn.Module, plan, target: torch.nn.Module, introduce, out: Path, resume: bool,
           progress: Progress, fingerprint: dict) -> tuple[torch.nn.Module, list[dict[str, Any]], GuideCache | None]:
    """Align ``target`` stage by stage (``introduce(target, stage)`` swaps in what a stage adds); checkpoint after each.

    In-place conversion starts from a copy of the guide and introduces replacements; architecture
    transfer starts from the separate target and introduces nothing. Returns the aligned target and the
    stage results, and the guide-activation cache if ``align.cache_guide`` made one. With ``resume``, stages
    already in ``out``'s stage checkpoint are rebuilt (same seeds) and their trained weights restored instead of
    retrained.
    """
    recipe, data, dev, seed = session.recipe, session.data, session.device, session.recipe.seed
    sim = recipe.similarity
    needed = min_batch(sim.kind, sim.k)
    batch = align_batch_size(recipe, dev)
    if min(batch, data.x_train.shape[0]) < needed:
        raise DataError(f"similarity {sim.kind} needs batches of ≥ {needed} samples; the training split has {data.x_train.shape[0]}")
    loss_fn = make_loss(sim.kind, sim.k, sim.tau)
    named = guide if recipe.target is None else target  # the model whose paths stages introduce
    matches = lambda pattern, path: pattern_matches(pattern, path, named.get_submodule(path))  # noqa: E731
    check_overrides(recipe.align.overrides, plan.stages, matches)
    align_gen = torch.Generator().manual_seed(seed + 1)
    cache = (GuideCache(data.x_train.shape[0], dev)
             if recipe.align.cache_guide and recipe.schedule.kind != "independent" else None)
    stages: list[dict[str, Any]] = []
    saved = resume_stages.load_stages(out, fingerprint) if resume else None
    main = current_dist().main
    if saved is None and main:
        resume_stages.clear(out)
    for index, stage in enumerate(plan.stages):
        torch.manual_seed(seed + 1000 + index)
        introduce(target, stage)
        if saved is not None and index < len(saved["stages"]):
            if index == len(saved["stages"]) - 1:  # the hybrid is complete up to the last saved stage: restore it
                target.load_state_dict(saved["state"])
                align_gen.set_state(saved["generator"])
                stages = saved["stages"]
                progress.log(f"resumed after stage {index + 1} of {len(plan.stages)}")
            continue
        cfg = recipe.align.for_stage(index + 1, stage.introduced, matches)
        result = align_stage(index, guide, target, stage, data.x_train, cfg, loss_fn,
                             batch, align_gen, dev, progress, sim.tokens, cache)
        stages.append(asdict(result))
        if main:
            resume_stages.save_stages(out, target, stages, align_gen, fingerprint)
    return target, stages, cache


def _plan(session: Session, guide: torch.nn.Module):
    """(plan, the model alignment starts from, how a stage introduces its modules) for either kind of recipe."""
    recipe, dev = session.recipe, session.device
    sample = session.data.x_train[:2].to(dev)
    if recipe.target is None:
        plan = build_plan(guide, recipe, sample)
        check_fits(session, guide, plan)
        by_path = {e.path: e for e in plan.entries}
        return plan, copy.deepcopy(guide), lambda target, stage: apply_entries(target, [by_path[p] for p in stage.introduced])
    target = current_runtime(dev).prepare(build_model(recipe.target.arch, recipe.target.kwargs, recipe.seed + 1000,
                                                       recipe.task).to(dev))
    check_classes(target, session.data, f"the target {recipe.target.arch}")
    plan = build_transfer_plan(guide, target, recipe, sample)  # also copies the inherited weights into target
    check_fits(session, guide, plan)
    return plan, target, lambda target, stage: None


def check_fits(session: Session, guide: torch.nn.Module, plan) -> None:
    """Before any work: the target can be trained on the device, and each batch size fits (lower bounds, see
    :mod:`theseus_cli.memory`). A plan of 700 billion parameters is refused here, not by the allocator."""
    recipe, data, dev = session.recipe, session.data, session.device
    biggest = max(plan.entries, key=lambda e: e.target_params, default=None)
    hint = (f" (the largest replacement: module '{biggest.path}' → {biggest.replacement} with {biggest.target_params:,} "
            f"parameters, replace[{biggest.rule}])" if biggest is not None else "")
    memory.require_trainable(plan.target_params, dev, "the target" + hint)
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
    memory.require_batches(guide, data.x_train[:1].to(dev), {
        "align.batch_size": min(align_batch_size(recipe, dev), n_train),
        "data.batch_size": min(recipe.data.batch_size, n_train),
        "data.eval_batch_size": min(recipe.data.eval_batch_size, n_test)}, dev)


def _naive(session: Session, guide: torch.nn.Module, plan) -> torch.nn.Module:
    """The baseline: the target architecture from scratch, or (``baseline.init: guide``) with every guide weight it
    can inherit — the kept modules in place, the stem/embeddings/head in a transfer — and no alignment."""
    recipe, seed, dev = session.recipe, session.recipe.seed, session.device
    torch.manual_seed(seed + 7)
    rt = current_runtime(dev)
    if recipe.target is not None:
        naive = rt.prepare(build_model(recipe.target.arch, recipe.target.kwargs, seed + 7, recipe.task).to(dev))
        if recipe.baseline.init == "guide":
            inherit_weights(guide, naive, plan.align_points)
        return naive
    if recipe.baseline.init == "guide":
        naive = copy.deepcopy(guide)
    else:
        naive = rt.prepare(build_model(recipe.guide.arch, recipe.guide.kwargs, seed + 7, recipe.task).to(dev))
    apply_entries(naive, plan.entries)
    return naive


def _plan_report(plan, recipe: Recipe) -> dict[str, Any]:
    stages = [asdict(st) for st in plan.stages]
    if recipe.target is None:
        return {"kind": "replace", "entries": [asdict(e) for e in plan.entries], "stages": stages}
    return {"kind": "transfer", "target": {"arch": recipe.target.arch, "kwargs": recipe.target.kwargs},
            "pairs": [asdict(p) for p in plan.pairs], "stem": plan.stem, "head": plan.head, "inherited": plan.inherited,
            "flops": {"guide": plan.guide_flops, "target": plan.target_flops}, "stages": stages}


def run_conversion(
    recipe: Recipe,
    out: str | Path,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    baseline: bool | None = None,
    overwrite: bool = False,
    progress: Progress = NullProgress(),
    resume: bool = False,
    gates: Gates = Gates(),
) -> dict[str, Any]:
    """Convert the recipe's guide into its target; write files into ``out``; return the report.

    ``gates`` are checked once the files are written; the verdict is ``report["gates"]`` (the CLI
    turns a failure into exit code 10, see :mod:`theseus_cli.gates`).

    With ``resume``, a run killed during alignment continues after its last finished stage
    (see :mod:`theseus_cli.resume`); without a stage checkpoint it starts afresh.

    Under ``torchrun`` (more than one process) the run is data-parallel (:mod:`theseus_cli.distributed`):
    rank 0 writes the files and returns the report, the other ranks return None.
    """
    started = time.perf_counter()
    out = Path(out)
    with process_group(device) as (dist, device), _hold(out, overwrite, resume, dist.main):
        if not dist.main:
            progress = NullProgress()
        session = open_session(recipe, checkpoint, device)
        if resume and finished(out):
            return _finished_run(out, session, gates) if dist.main else None
        check_world(session, dist)
        rt = resolve_runtime(recipe.runtime, session.device, session.data)
        if rt.data_on_device:
            session.data.to(session.device)
        rt.prepare(session.guide)
        try:
            with using(rt), graceful_stop():
                report = _convert(session, rt, out, recipe.baseline.enabled if baseline is None else baseline, resume,
                                  progress, started, gates)
        except Interrupted as stop:
            raise Interrupted(f"{stop.message}; rerun the same command with --resume to continue "
                              f"{resume_stages.describe(out)}", stop.exit_code - 128) from None
        dist.barrier()  # the other ranks wait until rank 0 has written every file
        return report if dist.main else None


def _finished_run(out: Path, session: Session, gates: Gates) -> dict[str, Any]:
    """``--resume`` of a run that had finished (killed after its report, or rerun by a CI step): nothing is redone,
    its report is returned, with the gates checked against it — if the same recipe and guide made it."""
    try:
        report = json.loads((out / REPORT_FILE).read_text())
        made_by = report["recipe_hash"], report["guide"].get("checkpoint_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OutputError(f"{out / REPORT_FILE}: unreadable report of a finished run ({exc}); use --overwrite") from None
    if made_by != (session.recipe.digest(), session.guide_info.get("checkpoint_sha256")):
        raise OutputError(f"{out}: holds a finished run of a different recipe or guide checkpoint; use another --out, "
                          "or --overwrite")
    if gates.any:
        report["gates"] = evaluate_gates(gates, report)
    return report


def _hold(out: Path, overwrite: bool, resume: bool, main: bool):
    """Rank 0 locks and prepares the run directory (:mod:`theseus_cli.rundir`); other ranks only check it."""
    if main:
        return run_directory(out, overwrite, resume)
    check_out_path(out, overwrite, resume)
    return contextlib.nullcontext(out)


def check_world(session: Session, dist: Dist) -> None:
    """Under torchrun every rank needs at least one sample of every batch it shards."""
    if not dist.enabled:
        return
    recipe, n = session.recipe, session.data.x_train.shape[0]
    for field, size in (("data.batch_size", recipe.data.batch_size), ("align.batch_size", align_batch_size(recipe, session.device))):
        if min(size, n) < dist.world:
            raise RecipeError(f"{field}: batches of {min(size, n)} cannot be split over {dist.world} processes")


def _convert(session: Session, rt: Runtime, out: Path, baseline: bool, resume: bool, progress: Progress,
             started: float, gates: Gates) -> dict[str, Any] | None:
    recipe = session.recipe
    main = current_dist().main
    seed, data, dev = recipe.seed, session.data, session.device
    task = get_task(recipe.task)
    guide = session.guide.eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    if recipe.task == "sentence-embedding":
        attach_guide_embeddings(session)
    plan, target, introduce = _plan(session, guide)
    what = f"{len(plan.entries)} modules to replace" if recipe.target is None else f"{len(plan.pairs)} target blocks to align"
    progress.log(f"plan: {what}, {plan.guide_params:,} → {plan.target_params:,} params")
    heldout = data.x_test[:HELDOUT_FOR_SIMILARITY]
    guide_points = plan.guide_points if recipe.target is not None else None

    fingerprint = {"recipe_hash": recipe.digest(), "guide": session.guide_info.get("checkpoint_sha256")}
    done = resume_stages.load_phase(out, fingerprint) if resume else None
    sim = recipe.similarity
    cache = None
    if done is not None:  # a resumed run whose alignment (and maybe fine-tuning) had finished
        for stage in plan.stages:
            introduce(target, stage)
        target.load_state_dict(done["state"])
        r = done["results"]
        progress.log(f"resumed {resume_stages.describe_phase(done['phase'])}")
    else:
        # ---- alignment (Algorithm 1), stage by stage as the schedule says
        t_align = time.perf_counter()
        target, stages, cache = _align(session, guide, plan, target, introduce, out, resume, progress, fingerprint)
        r = {"stages": stages, "align_seconds": time.perf_counter() - t_align}
        r["sim_after_align"] = (layer_similarity(guide, target, plan.align_points, heldout, dev, sim.k, sim.tokens,
                                                 guide_points) if main else None)
        # ---- BatchNorm recalibration
        r["bn_layers"] = 0
        if recipe.bn_recalibration.enabled:
            r["bn_layers"] = recalibrate_batchnorm(target, data.x_train, recipe.bn_recalibration.batches,
                                                   recipe.data.batch_size, torch.Generator().manual_seed(seed + 2), dev)
        r["m_aligned"] = _evaluate(target, session)
        if main:
            resume_stages.save_phase(out, "aligned", target, r, fingerprint)
    stages, align_steps = r["stages"], sum(s["steps"] for s in r["stages"])
    ft_steps, warmup = _task_steps(session)
    if done is None or done["phase"] == "aligned":
        # ---- end-to-end fine-tuning
        torch.manual_seed(seed + 3)  # dropout draws the same masks whether or not the run was resumed
        ft = _train_on_task(target, session, ft_steps, warmup, recipe.finetune.lr, seed + 3, "fine-tune target", progress)
        r["finetune"] = {"epoch_losses": ft.epoch_losses, "seconds": ft.seconds, "compile": ft.compile}
        r["m_target"] = _evaluate(target, session)
        r["sim_after_ft"] = (layer_similarity(guide, target, plan.align_points, heldout, dev, sim.k, sim.tokens,
                                              guide_points) if main else None)
        r["m_guide"] = _evaluate(guide, session)
        if main:
            resume_stages.save_phase(out, "finetuned", target, r, fingerprint)

    # ---- naive baseline: same target architecture from scratch, same total gradient steps
    baseline_report = None
    if baseline:
        naive = _naive(session, guide, plan)
        total = align_steps + ft_steps
        per_epoch = batches_per_epoch(data.labelled.numel(), recipe.data.batch_size)
        warm = int(round(recipe.finetune.warmup_epochs * per_epoch))
        lr = recipe.baseline.lr or recipe.finetune.lr
        res = _train_on_task(naive, session, total, warm, lr, seed + 4, "naive baseline", progress)
        baseline_report = {task.metric: _evaluate(naive, session), "init": recipe.baseline.init,
                           "steps": total, "lr": lr, "epoch_losses": res.epoch_losses, "seconds": res.seconds}

    if not main:  # every file and measurement below is rank 0's
        return None
    m_guide, m_aligned, m_target = r["m_guide"], r["m_aligned"], r["m_target"]
    sim_after_align, sim_after_ft = r["sim_after_align"], r["sim_after_ft"]

    # ---- what each model costs to deploy, on this device
    sample = data.x_test[:1]
    deployment = {"guide": profile_model(guide, sample, dev), "target": profile_model(target, sample, dev)}
    deployment["ratios"] = compare(deployment["guide"], deployment["target"])

    # ---- files
    # hf: directories are recorded as the config-built models they hold, so the file rebuilds without them
    guide_arch, guide_kwargs, tokenizer = portable_spec(recipe.guide.arch, recipe.guide.kwargs, data.tokenizer)
    target_spec = portable_spec(recipe.target.arch, recipe.target.kwargs, None)[:2] if recipe.target else None
    meta = {"guide": {"arch": guide_arch, "kwargs": guide_kwargs}, "task": recipe.task,
            "target": {"arch": target_spec[0], "kwargs": target_spec[1]} if target_spec else None,
            "entries": [asdict(e) for e in plan.entries], "input_shape": list(plan.input_shape),
            "num_classes": data.num_classes, "normalization": {"mean": data.mean, "std": data.std} if data.mean else None,
            "tokenizer": tokenizer,
            "recipe": recipe.resolved(), "recipe_hash": recipe.digest(), "theseus_version": __version__}
    save_target(out / TARGET_FILE, target.cpu(), meta)
    report = {
        "versions": versions(),
        "seed": seed,
        "device": str(dev),
        "runtime": {**rt.summary(), "align_batch_size": align_batch_size(recipe, dev)},
        "distributed": {"world_size": current_dist().world,
                        "backend": torch.distributed.get_backend() if current_dist().enabled else None},
        "recipe": recipe.resolved(),
        "recipe_hash": recipe.digest(),
        "guide": session.guide_info,
        "data": data.summary(),
        "plan": _plan_report(plan, recipe),
        "params": {"guide": plan.guide_params, "target": plan.target_params},
        "stages": stages,
        "similarity": {"optimised": sim.kind, "heldout_samples": int(heldout.shape[0]), "mknn_k": sim.k,
                       "after_alignment": sim_after_align, "after_finetune": sim_after_ft},
        "guide_cache": cache.summary() if cache is not None else None,
        "bn_recalibration": {"enabled": recipe.bn_recalibration.enabled, "layers": r["bn_layers"]},
        "task": recipe.task,
        "metric": {"name": task.metric, "higher_is_better": task.higher_is_better, "guide": m_guide,
                   "target_after_alignment": m_aligned, "target": m_target,
                   "baseline": baseline_report[task.metric] if baseline_report else None,
                   "retention": retention(task, m_guide, m_target)},
        "steps": {"alignment": align_steps, "finetune": ft_steps,
                  "baseline": baseline_report["steps"] if baseline_report else None},
        "finetune": r["finetune"],
        "baseline": baseline_report,
        "deployment": deployment,
        "wall_time": {"alignment": r["align_seconds"], "total": time.perf_counter() - started},
        "files": {"target": TARGET_FILE, "report": REPORT_FILE, "plot": PLOT_FILE},
    }
    plot_alignment(out / PLOT_FILE, stages, sim_after_align, sim.kind,
                   f"{recipe.guide.arch} → " + (recipe.target.arch if recipe.target else
                                                ", ".join(sorted({e.replacement for e in plan.entries}))))
    if gates.any:
        report["gates"] = evaluate_gates(gates, report)
    report["wall_time"]["total"] = time.perf_counter() - started
    write_json(out / REPORT_FILE, report)  # last: its presence marks a finished run
    resume_stages.clear(out)
    return report
