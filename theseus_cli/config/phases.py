"""The recipe sections that say how each phase trains: schedule, alignment, runtime, BatchNorm recalibration,
fine-tuning (with its optional teacher term) and the baselines."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from theseus_cli.config.base import StrictModel, check_pattern, check_patterns


class ScheduleConfig(StrictModel):
    kind: Literal["progressive", "sequential", "independent", "blockwise", "joint"] = "progressive"
    order: Literal["forward", "reverse"] = "forward"
    group_depth: Optional[int] = Field(None, ge=1, description="introduce modules sharing the first N path components in one stage")
    objective: Literal["similarity", "distill"] = Field(
        "similarity", description="what a stage trains its replacements on: the similarity between the hybrid's and "
        "the guide's activations at the replaced modules (NoT), or the KL between the hybrid's and the guide's output "
        "distributions (progressive distillation, the paper's Appendix I; in-place replace recipes only)")
    temperature: float = Field(4.0, gt=0, le=100, description="objective distill: the softmax temperature T")
    max_store_gb: Optional[float] = Field(None, gt=0, description="blockwise: refuse a guide pass that would store "
                                          "more block inputs than this on disk; default 90 % of the free disk")


class AutoStageConfig(StrictModel):
    """Hands-off stages (the paper's Appendix K): EMA of the loss drives LR decay and stopping."""

    enabled: bool = False
    max_epochs: int = Field(100, ge=1, description="hard cap on epochs per stage")
    stop_loss: float = Field(0.01, gt=0, description="stop the stage once the loss EMA falls below this")
    ema_steps: int = Field(500, ge=1, description="EMA window in steps (alpha = 2 / (window + 1))")
    patience: int = Field(4, ge=0, description="epochs without EMA improvement before the LR is reduced")
    factor: float = Field(0.5, gt=0, lt=1, description="LR multiplier on a plateau")
    min_lr: float = Field(1e-7, ge=0)
    check_every: int = Field(50, ge=1, description="steps between stop checks (each check reads the EMA back from the device)")


class StageOverride(StrictModel):
    """Settings for some stages: ``stage`` (1-based, as ``inspect`` numbers them) or ``match`` (a module pattern
    matching any module the stage introduces)."""

    stage: Optional[int] = Field(None, ge=1)
    match: Optional[str] = None
    lr: Optional[float] = Field(None, gt=0)
    epochs: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_selector(self) -> "StageOverride":
        if (self.stage is None) == (self.match is None):
            raise ValueError("give exactly one of stage or match")
        if self.match is not None:
            check_pattern(self.match)
        if self.lr is None and self.epochs is None:
            raise ValueError("an override sets lr, epochs or both")
        return self


class AlignConfig(StrictModel):
    epochs: int = Field(2, ge=0, description="passes over the training inputs per stage (max_epochs under auto)")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=2, description="alignment batch; default data.batch_size on the CPU and "
                                      "at least 1024 on CUDA (similarity estimates improve with batch size)")
    micro_batch_size: Optional[int] = Field(None, ge=2, description="run each alignment batch in slices of this many "
                                            "samples with the exact full-batch gradient (large batches in little memory)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw"] = "adamw"
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max global grad norm; null = off")
    cache_guide: bool = Field(False, description="compute the guide's output at each alignment point once per sample "
                              "and reuse it across epochs and stages (memory permitting)")
    auto: AutoStageConfig = Field(default_factory=AutoStageConfig)
    overrides: list[StageOverride] = Field(default_factory=list, description="per-stage lr/epochs; later entries win")

    def for_stage(self, number: int, introduced: list[str], matches) -> "AlignConfig":
        """This config with the overrides that select stage ``number`` (1-based) applied.

        ``matches(pattern, path)`` is the module-pattern predicate; it is passed in because the
        class-name form of a pattern needs the guide's module at ``path``.
        """
        cfg = self.model_copy(deep=True)
        for o in self.overrides:
            if o.stage == number or (o.match is not None and any(matches(o.match, p) for p in introduced)):
                cfg.lr = o.lr if o.lr is not None else cfg.lr
                cfg.epochs = o.epochs if o.epochs is not None else cfg.epochs
        return cfg


class RuntimeConfig(StrictModel):
    """How the run executes on its device (see :mod:`theseus_cli.training.runtime`); ``auto`` decides per device."""

    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="auto: on CUDA for images")
    data_on_device: Literal["auto", "on", "off"] = Field("auto", description="auto: on CUDA when the data fits easily")
    compile: bool = Field(False, description="torch.compile the model for task training; falls back to eager on failure")
    fsdp: bool = Field(False, description="under torchrun: shard guide and target by block with FSDP2 (fully_shard) "
                       "instead of holding both whole on every rank; see theseus_cli.training.fsdp")
    park_guide: Literal["auto", "always", "never"] = Field(
        "auto", description="while fine-tuning, the guide's weights the target does not use are written to "
                            "OUT/.parked and freed, then read back (auto: when they are at least 64 MiB and the disk "
                            "has room); see theseus_cli.training.parking")


class BNRecalConfig(StrictModel):
    enabled: bool = True
    batches: int = Field(50, ge=1, description="training batches used to re-estimate BatchNorm statistics")


class DistillConfig(StrictModel):
    """A teacher term added to task training: ``weight · T² · KL(guide ‖ model) + (1 − weight) · task loss``
    (:mod:`theseus_cli.training.distill`)."""

    weight: float = Field(0.5, ge=0, le=1, description="α of Hinton et al.: the teacher term's share of the loss")
    temperature: float = Field(4.0, gt=0, le=100, description="softmax temperature T of both distributions")
    inputs: Literal["all", "labelled"] = Field(
        "all", description="where the teacher term is computed: every training input alignment sees (labelled or "
        "not; one extra batch per step) or only the labelled batch")


BaselineRun = Literal["scratch", "guide-init", "distill"]
BASELINE_RUNS: tuple[str, ...] = BaselineRun.__args__  # type: ignore[attr-defined]


class PeftConfig(StrictModel):
    """Parameter-efficient fine-tuning with the PEFT library (:mod:`theseus_cli.training.lora`): LoRA adapters on the
    kept (frozen) modules, the replacements trained in full, the adapters merged into the weights at write time."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, description="r: the adapters' rank")
    alpha: float = Field(16.0, gt=0, description="LoRA's scale numerator: the update is (alpha / rank) · B·A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1D"], min_length=1,
        description="kept modules that get adapters: class names (subclasses too), 're:' patterns on the dotted path "
        "or exact paths; modules inside a replacement, and layers whose weight is tied to another's (GPT-2's head), "
        "never do")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return check_patterns(v, "targets")


class FinetuneConfig(StrictModel):
    epochs: int = Field(5, ge=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    optimizer: Literal["adamw"] = "adamw"
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, then cosine decay to zero")
    grad_clip: Optional[float] = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill: Optional[DistillConfig] = Field(None, description="add the guide as teacher to fine-tuning (off when "
                                             "absent; {} takes the defaults)")
    peft: Optional[PeftConfig] = Field(None, description="train LoRA adapters on the kept modules and the replacements "
                                       "in full, instead of every parameter (off when absent; {} takes the defaults)")
    checkpointing: bool = Field(False, description="activation checkpointing: each block's activations are "
                                "recomputed in the backward pass instead of kept (less memory, one more forward)")


class BaselineConfig(StrictModel):
    """What the conversion is compared with, each trained for exactly the conversion's gradient steps (alignment +
    fine-tuning) in the same run."""

    enabled: bool = Field(False, description="train the baselines (CLI: --baseline)")
    runs: list[BaselineRun] = Field(
        default_factory=lambda: ["scratch", "distill"], min_length=1,
        description="scratch: the target architecture from fresh weights on the labelled examples (the paper's naive "
        "target); guide-init: the guide's weights everywhere except the replaced modules (conversion without "
        "alignment); distill: fresh weights, the guide as teacher on every training input plus the task loss on "
        "the labelled ones")
    lr: Optional[float] = Field(None, gt=0, description="defaults to finetune.lr")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="the distill run's teacher term")
    init: Optional[Literal["scratch", "guide"]] = Field(
        None, description="older recipes: 'guide' is runs [guide-init], 'scratch' is runs [scratch]")

    @model_validator(mode="after")
    def _runs(self) -> "BaselineConfig":
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"runs: each baseline once, got {self.runs}")
        if self.init is not None:
            if "runs" in self.model_fields_set:
                raise ValueError("init: give runs only (init is the older spelling of runs: [scratch] or [guide-init])")
            self.runs, self.init = ["guide-init" if self.init == "guide" else "scratch"], None  # dumps re-parse
        return self
