"""``theseus convert``: the whole Network-of-Theseus pipeline as one library call.

:func:`run_conversion` runs a :class:`Conversion`, whose named phases are the pipeline:
plan → align (Algorithm 1 of the paper) → recalibrate (BatchNorm) → finetune (end to end) →
baselines (optionally) → profile → write. Its state lives on the object; it returns the report it writes.

Stage t of the progressive schedule swaps in the replacement for the t-th claimed module (execution order)
and trains replacements 1..t jointly on the mean of (1 − CKA) between each replaced module's output and the
guide's output at the same path (or, with ``schedule.objective: distill``, on the KL between the hybrid's and the
guide's outputs: progressive distillation); all other weights stay frozen and every BatchNorm keeps the guide's
statistics. The baselines (:mod:`theseus_cli.pipelines.baselines`: from scratch, from the guide's weights,
distilled from the guide) each train for as many gradient steps as the conversion took in all (alignment +
fine-tuning), as in the paper.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from theseus_cli.artifacts import REPORT_FILE
from theseus_cli.config.recipe import Recipe
from theseus_cli.data.core import batches_per_epoch, sample_batches
from theseus_cli.deploy.gates import Gates, evaluate_gates
from theseus_cli.errors import DataError, OutputError, TheseusWarning, UsageError
from theseus_cli.models.build import build_model
from theseus_cli.pipelines.baselines import distill_teacher, fresh_guide_architecture, train_baselines
from theseus_cli.pipelines.blockwise import align_blockwise, remove_store
from theseus_cli.pipelines.sharded import (prepare_sharded, restore_sharded_phase, restore_sharded_stage,
                                           save_sharded_phase, save_sharded_stage, unshard)
from theseus_cli.pipelines.checks import check_fits, check_overrides, check_world
from theseus_cli.pipelines.conversion_output import write_outputs
from theseus_cli.progress import NullProgress, Progress, seconds
from theseus_cli.rundir import check_out_path, finished, run_directory
from theseus_cli.seeds import Seeds
from theseus_cli.similarity import make_loss, min_batch
from theseus_cli.surgery.matching import pattern_matches
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.surgery.transfer import build_transfer_plan
from theseus_cli.tasks import get_task
from theseus_cli.training import (AlignJob, TaskJob, align_stage, evaluate, layer_similarity, recalibrate_batchnorm,
                                  train_task)
from theseus_cli.training import resume as resume_stages
from theseus_cli.training.distributed import current_dist, process_group
from theseus_cli.training.faults import Interrupted, graceful_stop
from theseus_cli.training.distill import Teacher
from theseus_cli.training.guide_cache import GuideCache
from theseus_cli.training.checkpointing import activation_checkpointing
from theseus_cli.training.lora import attach_lora
from theseus_cli.training.memory import release_freed_memory
from theseus_cli.training.parking import clear_parked, parked_guide
from theseus_cli.training.runtime import (Runtime, align_batch_size, conversion_runtime, current_runtime,
                                         frozen_weights_dtype, using)
from theseus_cli.training.session import Session, attach_guide_embeddings, check_classes, open_session

HELDOUT_FOR_SIMILARITY = 512


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """How to run a conversion, besides the recipe (the CLI's flags)."""

    checkpoint: Optional[str | Path] = None  # guide weights; default: the recipe's guide.checkpoint, else untrained
    device: str = "auto"
    baseline: Optional[bool] = None  # None: the recipe's baseline.enabled
    overwrite: bool = False
    resume: bool = False  # continue a killed run after its last finished stage (theseus_cli.training.resume)
    gates: Gates = field(default_factory=Gates)
    progress: Progress = field(default_factory=NullProgress)
    latency: bool = True  # time guide and target; off: the report's deployment has params and FLOPs only (faster)


def run_conversion(recipe: Recipe, out: str | Path, options: ConvertOptions | None = None,
                   session: Session | None = None) -> dict[str, Any] | None:
    """Convert the recipe's guide into its target; write files into ``out``; return the report.

    ``options.gates`` are checked once the files are written; the verdict is ``report["gates"]`` (the CLI
    turns a failure into exit code 10, see :mod:`theseus_cli.deploy.gates`). With ``options.resume``, a run
    killed during alignment continues after its last finished stage; without a stage checkpoint it starts afresh.
    Under ``torchrun`` (more than one process) the run is data-parallel (:mod:`theseus_cli.training.distributed`):
    rank 0 writes the files and returns the report, the other ranks return None. ``session``: guide and data already
    open (``theseus search``'s trials share them; its recipe is replaced by ``recipe``), else opened here.
    """
    options = options or ConvertOptions()
    if options.gates.max_latency_ms is not None and not options.latency:
        raise UsageError("--max-latency-ms gates on the measured latency; it cannot be combined with --no-latency")
    started = time.perf_counter()
    out = Path(out)
    if recipe.runtime.fsdp and options.baseline:
        raise UsageError("--baseline: the baselines are not sharded; run them without runtime.fsdp")
    with process_group(options.device) as (dist, device), _sharding(recipe, dist) as dist, _hold(out, options, dist.main):
        progress = options.progress if dist.main else NullProgress()
        session = (dataclasses.replace(session, recipe=recipe) if session is not None
                   else open_session(recipe, options.checkpoint, device, weights_dtype=frozen_weights_dtype(recipe)))
        untrained = warn_untrained(session) if dist.main else None
        if options.resume and finished(out):
            return finished_run(out, session, options.gates) if dist.main else None
        check_world(session, dist)
        progress.log(f"convert: guide {recipe.guide.arch} on {recipe.data.source} "  # after the set-up's checks
                     f"({session.data.x_train.shape[0]:,} training inputs), device {session.device}")
        rt = conversion_runtime(recipe, session.device, session.data)
        if rt.data_on_device:
            session.data.to(session.device)
        rt.prepare(session.guide)
        conversion = Conversion(session, rt, out, options, progress, started)
        conversion.warnings = [untrained] if untrained else []
        try:
            with using(rt), graceful_stop():
                report = conversion.run()
        except Interrupted as stop:
            raise Interrupted(f"{stop.message}; rerun the same command with --resume to continue "
                              f"{resume_stages.describe(out)}", stop.exit_code - 128) from None
        dist.barrier()  # the other ranks wait until rank 0 has written every file
        return report if dist.main else None


UNTRAINED_MATTERS = ("classification", "causal-lm")  # tasks whose guide is trained on labels or text before converting


def warn_untrained(session: Session) -> str | None:
    """One :class:`TheseusWarning` when a classification or language-model conversion starts from an untrained
    guide (no checkpoint given, none in the recipe): converting random weights is seldom what was meant, and the
    report would say so only in its tables. Sentence-embedding guides are always pretrained (their own check)."""
    if session.guide_info["trained"] or session.recipe.task not in UNTRAINED_MATTERS:
        return None
    message = (f"the guide {session.recipe.guide.arch} is untrained: no checkpoint was given and the recipe names none, "
               "so the conversion aligns the target to random weights; pass the trained guide (CLI: the GUIDE argument; "
               "library: ConvertOptions(checkpoint=…)) unless that is what you meant")
    warnings.warn(TheseusWarning(message), stacklevel=3)
    return message


@dataclass
class Results:
    """What the phases measured; saved with the phase checkpoints, so a resumed run reports what it skipped."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    align_seconds: float = 0.0
    sim_after_align: Optional[dict] = None
    bn_layers: int = 0
    m_aligned: Optional[float] = None
    finetune: Optional[dict] = None
    m_target: Optional[float] = None
    sim_after_ft: Optional[dict] = None
    m_guide: Optional[float] = None
    align_store: Optional[dict] = None  # blockwise: the block store's size, samples and guide-pass seconds


def hybrid_start(guide: torch.nn.Module, shared: bool) -> torch.nn.Module:
    """The model a replace recipe's alignment starts from: a copy of the guide. ``shared`` (``finetune.peft``: the
    kept weights are never trained) holds no second copy of the guide's parameters: the copy's modules point at the
    guide's own (frozen) tensors, and only buffers (BatchNorm's statistics, which recalibration and training mode
    update) are copied. Memory is then about one guide plus the replacements, their gradients and optimiser state;
    LoRA un-shares the layers it merges into (:meth:`theseus_cli.training.lora.LoraAdapters.merge`)."""
    if not shared:
        return copy.deepcopy(guide)
    return copy.deepcopy(guide, memo={id(p): p for p in guide.parameters()})


class Conversion:
    """One conversion, phase by phase: :meth:`plan`, :meth:`align`, :meth:`recalibrate`, :meth:`finetune`,
    :meth:`baselines`, :meth:`profile`, :meth:`write`. :meth:`run` chains them and skips what a resumed run
    had finished."""

    def __init__(self, session: Session, rt: Runtime, out: Path, options: ConvertOptions, progress: Progress,
                 started: float):
        self.session, self.recipe, self.rt, self.out, self.options = session, session.recipe, rt, out, options
        self.progress, self.started = progress, started
        self.seeds = Seeds(self.recipe.seed)
        self.task = get_task(self.recipe.task)
        self.main = current_dist().main
        self.sharded = current_dist().sharded  # runtime.fsdp under torchrun (theseus_cli.pipelines.sharded)
        self.fingerprint = {"recipe_hash": self.recipe.digest(), "guide": session.guide_info.get("checkpoint_sha256"),
                            "checkpoint": session.guide_info.get("checkpoint")}  # the path: named, not compared
        self.results = Results()
        self.cache: GuideCache | None = None
        self.baselines_: dict[str, dict[str, Any]] | None = None
        self.deployment: dict[str, Any] | None = None
        self.warnings: list[str] = []  # report["warnings"]: what the user most likely did not mean
        # a resumed run: the earlier legs' wall seconds (up to their last checkpoint) and their alignment seconds
        self.legs_before, self.align_before = (resume_stages.load_legs(out) if options.resume else ([], 0.0))
        self.align_started: float | None = None

    def run(self) -> dict[str, Any] | None:
        clear_parked(self.out, current_dist().rank)  # what a killed run had parked
        self.plan()
        done = resume_stages.load_phase(self.out, self.fingerprint) if self.options.resume else None
        if done is None:
            self.align()
            self.recalibrate()
            self._checkpoint("aligned")
        else:  # a resumed run whose alignment (and maybe fine-tuning) had finished
            self._restore_phase(done)
        if done is None or done["phase"] == "aligned":
            self.finetune()
            self._checkpoint("finetuned")
        baseline = self.recipe.baseline.enabled if self.options.baseline is None else self.options.baseline
        if baseline:
            self.baselines()
        if self.sharded:
            unshard(self)  # every rank gathers; rank 0 gets the plain guide and target
        if not self.main:  # every file and measurement below is rank 0's
            return None
        self.profile()
        return self.write()

    # ------------------------------------------------------------------ phases

    def plan(self) -> None:
        """The plan, the model alignment starts from, and how a stage introduces its modules (either recipe kind)."""
        recipe, session, dev = self.recipe, self.session, self.session.device
        self.guide = session.guide.eval()
        for p in self.guide.parameters():
            p.requires_grad_(False)
        if recipe.task == "sentence-embedding":
            attach_guide_embeddings(session)
        sample = session.data.x_train[:2].to(dev)
        if recipe.target is None:
            self.plan_ = build_plan(self.guide, recipe, sample)
            self.by_path = {e.path: e for e in self.plan_.entries}
            self.target = (hybrid_start(self.guide, shared=recipe.finetune.peft is not None)
                           if recipe.start == "guide" else fresh_guide_architecture(self, self.seeds.target_init))
            self.introduce = self._introduce_entries
        else:
            self.target = current_runtime(dev).prepare(build_model(recipe.target.arch, recipe.target.kwargs,
                                                                   self.seeds.target_init, recipe.task).to(dev))
            check_classes(self.target, session.data, f"the target {recipe.target.arch}")
            self.plan_ = build_transfer_plan(self.guide, self.target, recipe, sample)  # also copies inherited weights
            self.introduce = lambda target, stage: None
        baseline = self.recipe.baseline.enabled if self.options.baseline is None else self.options.baseline
        check_fits(session, self.guide, self.plan_, baseline)
        plan = self.plan_
        what = f"{len(plan.entries)} modules to replace" if recipe.target is None else f"{len(plan.pairs)} target blocks to align"
        self.progress.log(f"plan: {what}, {plan.guide_params:,} → {plan.target_params:,} params")
        self.heldout = session.data.x_test[:HELDOUT_FOR_SIMILARITY]
        if recipe.runtime.fsdp:
            prepare_sharded(self)

    def align(self) -> None:
        """Align the target stage by stage as the schedule says; checkpoint after each stage. With ``resume``,
        stages already checkpointed are rebuilt (same seeds) and their trained weights restored, not retrained."""
        started = self.align_started = time.perf_counter()
        job = self._align_job()
        sim = self.recipe.similarity.kind if self.recipe.schedule.objective == "similarity" else "output KL"
        self.progress.log(f"align: {len(self.plan_.stages)} stages, {self.recipe.schedule.kind} schedule, {sim}")
        if self.recipe.schedule.kind == "blockwise":
            self._finish_align(align_blockwise(self, job))
            return
        saved = resume_stages.load_stages(self.out, self.fingerprint) if self.options.resume else None
        if saved is None and self.main:
            resume_stages.clear(self.out)
        stages: list[dict[str, Any]] = []
        first = None  # the first stage this run trains (a resumed run skips the saved ones)
        for index, stage in enumerate(self.plan_.stages):
            torch.manual_seed(self.seeds.stage(index))
            self.introduce(self.target, stage)
            if saved is not None and index < len(saved["stages"]):
                if index == len(saved["stages"]) - 1:  # the hybrid is complete up to the last saved stage: restore it
                    if self.sharded:
                        restore_sharded_stage(self, saved)
                    else:
                        self.target.load_state_dict(saved["state"])
                    job.generator.set_state(saved["generator"])
                    stages = saved["stages"]
                    self.progress.log(f"resumed after stage {index + 1} of {len(self.plan_.stages)}")
                continue
            cfg = self.recipe.align.for_stage(index + 1, stage.introduced, self._matches)
            result = align_stage(index, self.guide, self.target, stage, self.session.data.x_train,
                                 dataclasses.replace(job, cfg=cfg))
            stages.append(asdict(result))
            self._log_stage(result, index, len(self.plan_.stages), time.perf_counter() - started, first)
            first = first if first is not None else index
            if self.sharded:
                save_sharded_stage(self, stages, job.generator)
            elif self.main:
                resume_stages.save_stages(self.out, self.target, stages, job.generator, self.fingerprint)
            if self.main:
                self._save_legs()
        self._finish_align(stages)

    def _finish_align(self, stages: list[dict[str, Any]]) -> None:
        self.results.stages, self.results.align_seconds = stages, self._align_seconds()
        self.align_started = None
        self.results.sim_after_align = self._similarity()

    def _log_stage(self, result, index: int, count: int, elapsed: float, first: int | None) -> None:
        """``stage 3/9 aligned (cka loss 0.16, 120 steps) 31 s, ~62 s left``. What is left is the stages to come at
        the larger of the mean stage time so far and the last stage's: progressive stages grow (stage t trains t
        replacements), so a plain mean would underestimate from the first stage on."""
        losses = list(result.final_layer_losses.values())
        kind = self.recipe.similarity.kind if self.recipe.schedule.objective == "similarity" else "KL"
        loss = f"{kind} loss {sum(losses) / len(losses):.3g}, " if losses else ""
        trained, to_come = index + 1 - (index if first is None else first), count - index - 1
        left = f", ~{seconds(max(elapsed / trained, result.seconds) * to_come)} left" if to_come else ""
        self.progress.log(f"stage {index + 1}/{count} aligned ({loss}{result.steps:,} steps) "
                          f"{seconds(result.seconds)}{left}")

    def recalibrate(self) -> None:
        """BatchNorm statistics re-estimated on training inputs; then the aligned target's metric."""
        bn, recipe = self.recipe.bn_recalibration, self.recipe
        if bn.enabled:
            self.results.bn_layers = recalibrate_batchnorm(self.target, self.session.data.x_train, bn.batches,
                                                           recipe.data.batch_size, self.seeds.generator("recalibrate"),
                                                           self.session.device)
        self.results.m_aligned = self.evaluate(self.target)
        bn_text = f"recalibrated {self.results.bn_layers} BatchNorm layers; " if bn.enabled else ""
        self.progress.log(f"{bn_text}aligned target: test {self.task.metric} {self.results.m_aligned:.4f}")

    def finetune(self) -> None:
        """End-to-end fine-tuning on the task; then the metrics and similarities after it."""
        ft_steps, warmup = self.task_steps()
        release_freed_memory()  # what alignment and evaluation freed, before fine-tuning's optimiser state is made
        torch.manual_seed(self.seeds.finetune)  # dropout draws the same masks whether or not the run was resumed
        cfg = self.recipe.finetune
        teacher = distill_teacher(self, cfg.distill, "finetune_teacher") if cfg.distill is not None else None
        adapters = attach_lora(self.target, cfg.peft, [e.path for e in self.plan_.entries]) if cfg.peft else None
        lora = (f"; LoRA rank {cfg.peft.rank} on {len(adapters.targets)} kept modules, {adapters.trainable:,} "
                f"parameters trained, {adapters.frozen:,} frozen" if adapters else "")
        self.progress.log(f"fine-tune: {cfg.epochs:g} epoch{'' if cfg.epochs == 1 else 's'}, {ft_steps:,} steps{lora}")
        with self._parked_guide(teacher) as parked, activation_checkpointing(self.target, cfg.checkpointing):
            ft = self.train_on_task(self.target, ft_steps, warmup, cfg.lr, "finetune", "fine-tune target", teacher,
                                    marked_only=adapters is not None)
        if adapters is not None:
            self.target = adapters.merge()
        frozen = frozen_weights_dtype(self.recipe)
        if frozen is not None:  # one dtype throughout, as the frozen weights: it evaluates, exports and writes as such
            self.target.to(frozen)
        self.results.finetune = {"epoch_losses": ft.epoch_losses, "seconds": ft.seconds, "compile": ft.compile,
                                 "distill": cfg.distill.model_dump() if cfg.distill is not None else None,
                                 "peft": adapters.summary() if adapters is not None else None,
                                 "parked_guide": parked.summary() if parked is not None else None}
        self.results.m_target = self.evaluate(self.target)
        self.results.sim_after_ft = self._similarity()
        self.results.m_guide = self.evaluate(self.guide)
        self.progress.log(f"fine-tuned target: test {self.task.metric} {self.results.m_target:.4f} "
                          f"(guide {self.results.m_guide:.4f})")

    def _parked_guide(self, teacher: Teacher | None):
        """The guide's tensors the target does not use, on disk while fine-tuning (``runtime.park_guide``,
        :mod:`theseus_cli.training.parking`); not when the guide teaches (``finetune.distill``) or is sharded."""
        mode = self.recipe.runtime.park_guide
        if teacher is not None or self.sharded:
            mode = "never"
        return parked_guide(self.guide, self.target, self.out, mode, current_dist().rank, self.progress)

    def baselines(self) -> None:
        """What the user would do instead (:mod:`theseus_cli.pipelines.baselines`), for the same total gradient steps."""
        finished = resume_stages.load_baselines(self.out, self.fingerprint) if self.options.resume else {}
        def save(so_far):
            resume_stages.save_baselines(self.out, so_far, self.fingerprint)
            self._save_legs()
        save = save if self.main else None
        self.baselines_ = train_baselines(self, finished, save)

    def profile(self) -> None:
        """What guide and target cost to deploy, on this device."""
        from theseus_cli.deploy.profile import profile_pair

        sample, dev = self.session.data.x_test[:1], self.session.device
        timed = self.options.latency
        self.progress.log("profile: params, FLOPs" + (f" and latency on {dev}, guide and target alternating" if timed else ""))
        self.deployment = profile_pair(self.guide, self.target, sample, dev, latency=timed)

    def write(self) -> dict[str, Any]:
        """The target file, the plot, the gates' verdict and, last (its presence marks a finished run), the report."""
        report = write_outputs(self)
        resume_stages.clear(self.out)
        remove_store(self.out)
        self.progress.log(f"wrote {self.out}")
        return report

    # ------------------------------------------------------------------ helpers

    @property
    def align_steps(self) -> int:
        return sum(s["steps"] for s in self.results.stages)

    def _introduce_entries(self, target, stage) -> None:
        """A replace recipe's stage: its replacements built in ``target``. Under bf16 frozen weights a start measured on
        the hybrid (``init: activation_svd``) runs it under autocast, as training does."""
        frozen = frozen_weights_dtype(self.recipe) is not None
        with self.rt.autocast() if frozen else contextlib.nullcontext():
            apply_entries(target, [self.by_path[p] for p in stage.introduced], self.calibration)

    def _matches(self, pattern: str, path: str) -> bool:
        named = self.guide if self.recipe.target is None else self.target  # the model whose paths stages introduce
        return pattern_matches(pattern, path, named.get_submodule(path))

    def _align_job(self) -> AlignJob:
        recipe, data, dev, sim = self.recipe, self.session.data, self.session.device, self.recipe.similarity
        needed, batch = min_batch(sim.kind, sim.k), align_batch_size(recipe, dev)
        if min(batch, data.x_train.shape[0]) < needed:
            raise DataError(f"similarity {sim.kind} needs batches of ≥ {needed} samples; the training split has "
                            f"{data.x_train.shape[0]}")
        check_overrides(recipe.align.overrides, self.plan_.stages, self._matches)
        if recipe.align.cache_guide and recipe.schedule.kind != "independent":
            self.cache = GuideCache(data.x_train.shape[0], dev)
        return AlignJob(recipe.align, make_loss(sim.kind, sim.k, sim.tau), batch, self.seeds.generator("align"), dev,
                        self.progress, sim.tokens, self.cache, recipe.schedule.objective, recipe.schedule.temperature,
                        self.task, len(self.plan_.stages))

    def _similarity(self) -> dict | None:
        """Every similarity metric at every aligned point on held-out inputs (rank 0 only; sharded, every rank runs
        the forwards, each needing all ranks)."""
        if not self.main and not self.sharded:
            return None
        sim, plan = self.recipe.similarity, self.plan_
        guide_points = plan.guide_points if self.recipe.target is not None else None
        return layer_similarity(self.guide, self.target, plan.align_points, self.heldout, self.session.device, sim.k,
                                sim.tokens, guide_points)

    def task_steps(self) -> tuple[int, int]:
        """(fine-tuning steps, warm-up steps) from the recipe's epochs over the labelled set."""
        ft = self.recipe.finetune
        per_epoch = batches_per_epoch(self.session.data.labelled.numel(), self.recipe.data.batch_size)
        return ft.epochs * per_epoch, int(round(ft.warmup_epochs * per_epoch))

    def train_on_task(self, model, steps: int, warmup: int, lr: float, stream: str, label: str,
                      teacher: Teacher | None = None, marked_only: bool = False):
        """``steps`` task-training steps on the labelled examples, batches from the ``stream`` seed, with fine-tuning's
        optimiser settings; with a ``teacher``, its term is added (:mod:`theseus_cli.training.distill`)."""
        ft, data = self.recipe.finetune, self.session.data
        x = data.x_train[data.labelled]
        y = data.y_train[data.labelled] if data.y_train is not None else None
        return train_task(model, self.task, x, y, TaskJob(steps, lr, ft.weight_decay, warmup, ft.grad_clip,
                                                          ft.label_smoothing, self.recipe.data.batch_size,
                                                          self.seeds.generator(stream), self.session.device, label,
                                                          self.progress, teacher, marked_only))

    def calibration(self, n: int) -> Iterator[Any]:
        """``n`` training inputs in a seeded random order, in evaluation-sized batches on the device: what a replacement
        whose start depends on its inputs (``init: activation_svd``) measures them on."""
        return sample_batches(self.session.data.x_train, n, self.recipe.data.eval_batch_size,
                              self.seeds.generator("calibration"), self.session.device)

    def evaluate(self, model) -> float:
        data = self.session.data
        return evaluate(model, self.task, data.x_test, data.y_test, self.recipe.data.eval_batch_size, self.session.device)

    def _checkpoint(self, phase: str) -> None:
        if self.sharded:
            save_sharded_phase(self, phase, asdict(self.results))
            if self.main:
                self._save_legs()
        elif self.main:
            resume_stages.save_phase(self.out, phase, self.target, asdict(self.results), self.fingerprint)
            self._save_legs()

    def _align_seconds(self) -> float:
        """The alignment's wall seconds over every leg: while aligning, the earlier legs' and this one's so far;
        after, what :meth:`align` recorded (or a resumed phase checkpoint restored)."""
        if self.align_started is None:
            return self.results.align_seconds
        return self.align_before + time.perf_counter() - self.align_started

    def _save_legs(self) -> None:
        resume_stages.save_legs(self.out, [*self.legs_before, time.perf_counter() - self.started], self._align_seconds())

    def wall_time(self) -> dict[str, Any]:
        """The report's ``wall_time``: alignment and total over all legs; ``legs`` (seconds of each, the killed ones
        up to their last checkpoint) and ``resumed`` say whether the run was resumed."""
        this_leg = time.perf_counter() - self.started
        return {"alignment": self.results.align_seconds, "total": sum(self.legs_before) + this_leg,
                "legs": [*self.legs_before, this_leg], "resumed": bool(self.legs_before)}

    def _restore_phase(self, done: dict[str, Any]) -> None:
        for stage in self.plan_.stages:
            self.introduce(self.target, stage)
        if self.sharded:
            restore_sharded_phase(self, done)
        else:
            self.target.load_state_dict(done["state"])
        self.results = Results(**done["results"])
        self.progress.log(f"resumed {resume_stages.describe_phase(done['phase'])}")


def finished_run(out: Path, session: Session, gates: Gates) -> dict[str, Any]:
    """``--resume`` of a run that had finished (killed after its report, or rerun by a CI step): nothing is redone,
    its report is returned, with the gates checked against it — if the same recipe and guide made it."""
    try:
        report = json.loads((out / REPORT_FILE).read_text())
        made_by = {"recipe_hash": report["recipe_hash"], "guide": report["guide"].get("checkpoint_sha256"),
                   "checkpoint": report["guide"].get("checkpoint")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OutputError(f"{out / REPORT_FILE}: unreadable report of a finished run ({exc}); use --overwrite") from None
    now = {"recipe_hash": session.recipe.digest(), "guide": session.guide_info.get("checkpoint_sha256"),
           "checkpoint": session.guide_info.get("checkpoint")}
    difference = resume_stages.fingerprint_difference(made_by, now)
    if difference:
        raise OutputError(f"{out}: holds a finished run {difference}; use another --out, or --overwrite")
    if gates.any:
        report["gates"] = evaluate_gates(gates, report)
    return report


@contextlib.contextmanager
def _sharding(recipe: Recipe, dist):
    """The run's :class:`~theseus_cli.training.distributed.Dist`, marked sharded under ``runtime.fsdp`` with more
    than one process (:mod:`theseus_cli.training.fsdp`)."""
    if not (recipe.runtime.fsdp and dist.enabled):
        yield dist
        return
    from theseus_cli.context import changed

    sharded = dataclasses.replace(dist, sharded=True)
    with changed(dist=sharded):
        yield sharded


def _hold(out: Path, options: ConvertOptions, main: bool):
    """Rank 0 locks and prepares the run directory (:mod:`theseus_cli.rundir`); other ranks only check it."""
    if main:
        return run_directory(out, options.overwrite, options.resume)
    check_out_path(out, options.overwrite, options.resume)
    return contextlib.nullcontext(out)
