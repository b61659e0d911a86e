"""Knowledge distillation (Hinton et al., 2015): the teacher term of the ``distill`` baseline, of fine-tuning's
optional teacher term (``finetune.distill``) and of progressive distillation (``schedule.objective: distill``).

The term compares the student's output with the teacher's (the guide's) on the same inputs:

* ``classification`` — ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over examples.
* ``causal-lm`` — the same per next-token distribution over the vocabulary, averaged over the positions the task
  loss counts (padding masked out exactly as :meth:`theseus_cli.tasks.Task.loss` masks it).
* ``sentence-embedding`` — the task already is distillation of the guide's embeddings, and an embedding is not a
  distribution: the term is ``1 − cosine`` between the student's and the teacher's sentence embeddings (the
  temperature does not apply). What the ``distill`` baseline adds there is the unlabelled inputs.

Why ``T²``: gradients of the softened KL shrink as ``1 / T²``, so the factor keeps the teacher term's weight
independent of the temperature (Hinton et al., §2). The defaults ``T = 4`` and ``α = 0.5`` are the common choice
in the literature and in torchdistill's KD configurations: soft enough that the teacher's ranking of wrong classes
carries information, with the labelled task loss kept at equal weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from theseus_cli.batch import run_model
from theseus_cli.data.dataset import iterate_batches
from theseus_cli.models.hf import model_output
from theseus_cli.tasks import Task, sentence_embedding, shifted


def teacher_term(student_out, teacher_out, x, task: Task, temperature: float) -> torch.Tensor:
    """The distillation term for one batch (a scalar, float32): see the module docstring per task."""
    s, t = model_output(student_out), model_output(teacher_out)
    if task.name == "sentence-embedding":
        return (1.0 - F.cosine_similarity(sentence_embedding(s, x), sentence_embedding(t, x), dim=-1)).mean()
    if task.name == "causal-lm":
        s, targets = shifted(s, x)
        t, _ = shifted(t, x)
        keep = targets != -100
        s, t = s[keep], t[keep]
    return softened_kl(s, t, temperature)


def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T))`` for (rows, classes) logits."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # no position to distil in this batch (all padding)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


@dataclass
class Teacher:
    """The teacher term of task training: ``weight · teacher_term + (1 − weight) · task loss``.

    ``inputs`` is the training split the term is computed on: all training inputs (labelled or not; its batches
    come from their own ``generator``, one per step, so the step count stays the task's), or None: the labelled
    batch itself.
    """

    model: nn.Module
    weight: float
    temperature: float
    inputs: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Index batches over ``inputs`` without end (reshuffled each pass)."""
        if self.inputs is None:
            raise ValueError("a teacher on the labelled batch draws no batches of its own")
        while True:
            yield from iterate_batches(self.inputs.shape[0], batch_size, self.generator)

    @torch.no_grad()
    def outputs(self, x):
        """The teacher's outputs on batch ``x`` (no graph; the guide stays in eval mode)."""
        return run_model(self.model.eval(), x)
