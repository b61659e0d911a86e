"""Training: alignment stages (Algorithm 1), task training, evaluation, BatchNorm recalibration, the distillation
term (a teacher in task training; progressive distillation), and what a long
run needs around them — the runtime (precision, compile), torchrun, the guide-activation cache, faults, resume."""

from theseus_cli.training.alignment import (MAX_TOKEN_ROWS, AlignJob, StageResult, StageTrainer, align_stage,
                                            micro_batched_step, output_distillation_loss, set_trainable, stage_losses)
from theseus_cli.training.distill import Teacher, softened_kl, teacher_term
from theseus_cli.training.loops import (TaskJob, TaskTrainer, TaskTrainResult, embed, evaluate, layer_similarity,
                                        lr_factor, recalibrate_batchnorm, train_task)

__all__ = ["MAX_TOKEN_ROWS", "AlignJob", "StageResult", "StageTrainer", "align_stage", "micro_batched_step",
           "output_distillation_loss", "set_trainable", "stage_losses", "Teacher", "softened_kl", "teacher_term",
           "TaskJob", "TaskTrainer", "TaskTrainResult", "embed", "evaluate", "layer_similarity", "lr_factor",
           "recalibrate_batchnorm", "train_task"]
