"""The distillation term against float64 references; the teacher term inside task training."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from theseus_cli.batch import TokenBatch
from theseus_cli.tasks import get_task
from theseus_cli.training.distill import Teacher, softened_kl, teacher_term
from theseus_cli.training.loops import TaskJob, TaskTrainer
from tests.numeric import f32_tolerance, kl_magnitude


def _reference_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """T² · mean over rows of Σ p (log p − log q), written out in float64."""
    total = 0.0
    for s_row, t_row in zip(student.double(), teacher.double()):
        p = torch.exp(t_row / t) / torch.exp(t_row / t).sum()
        q = torch.exp(s_row / t) / torch.exp(s_row / t).sum()
        total += float((p * (p.log() - q.log())).sum())
    return t * t * total / student.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_softened_kl_matches_a_float64_reference_with_the_t_squared_factor(temperature):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3
    tol = f32_tolerance(kl_magnitude(s, t, temperature), terms=5)
    assert float(softened_kl(s, t, temperature)) == pytest.approx(_reference_kl(s, t, temperature), abs=tol)
    assert float(softened_kl(t, t, temperature)) == pytest.approx(0.0, abs=f32_tolerance(kl_magnitude(t, t, temperature), 5))


def test_causal_lm_term_counts_only_the_positions_the_task_loss_counts():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    x = TokenBatch(ids, mask)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    value = float(teacher_term(s, t, x, get_task("causal-lm"), 2.0))
    # position i predicts token i + 1; it counts when token i + 1 is real: row 0 positions 0..4, row 1 positions 0..1
    kept = [(0, i) for i in range(5)] + [(1, 0), (1, 1)]
    rows_s = torch.stack([s[b, i] for b, i in kept])
    rows_t = torch.stack([t[b, i] for b, i in kept])
    assert value == pytest.approx(_reference_kl(rows_s, rows_t, 2.0), abs=f32_tolerance(kl_magnitude(rows_s, rows_t, 2.0), 11))
    s2 = s.clone()
    s2[1, 2:] = 100.0  # logits at positions predicting padding change nothing
    s2[:, -1] = -50.0  # nor does the last position, which predicts no token
    same = f32_tolerance(kl_magnitude(rows_s, rows_t, 2.0), 11)
    assert float(teacher_term(s2, t, x, get_task("causal-lm"), 2.0)) == pytest.approx(value, abs=same)


def test_sentence_embedding_term_is_one_minus_cosine_of_the_pooled_embeddings():
    g = torch.Generator().manual_seed(3)
    x = TokenBatch(torch.zeros(3, 4, dtype=torch.int64), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]))
    s, t = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    expected = []
    for b in range(3):
        n = int(x.mask[b].sum())
        expected.append(1 - F.cosine_similarity(s[b, :n].double().mean(0), t[b, :n].double().mean(0), dim=0))
    value = float(teacher_term(s, t, x, get_task("sentence-embedding"), 4.0))
    # each cosine is a ratio of sums of 8 products of pooled vectors, of size ≤ 1 once normalised
    assert value == pytest.approx(float(torch.stack(expected).mean()), abs=f32_tolerance(1.0, terms=8, ops=8))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_a_training_step_mixes_teacher_term_and_task_loss_by_weight(weight):
    torch.manual_seed(0)
    student, guide = nn.Linear(6, 4), nn.Linear(6, 4)
    x_all = torch.randn(40, 6)
    xb, yb = x_all[:8], torch.randint(0, 4, (8,))
    teacher = Teacher(guide, weight, 3.0, x_all, torch.Generator().manual_seed(0))
    job = TaskJob(1, 1e-3, 0.0, 0, None, 0.0, 16, torch.Generator().manual_seed(0), torch.device("cpu"), "t",
                  teacher=teacher)
    trainer = TaskTrainer(student, get_task("classification"), job)
    trainer.forward = student
    tb = x_all[10:26]
    loss = float(trainer._step(xb, yb, 1.0, (tb, 1.0)).detach())
    with torch.no_grad():
        logits = student(xb).double()
        task = F.cross_entropy(logits, yb)
        term = _reference_kl(student(tb), guide(tb), 3.0)
        ce_size = float((logits.abs() + logits.logsumexp(-1, keepdim=True).abs()).mean(0).sum())
        size = weight * kl_magnitude(student(tb), guide(tb), 3.0) + (1 - weight) * ce_size
    assert loss == pytest.approx(weight * term + (1 - weight) * float(task), abs=f32_tolerance(size, terms=4))
    assert all(p.grad is not None for p in student.parameters()) and guide.weight.grad is None


def test_teacher_batches_cover_every_input_and_go_on_past_one_pass():
    teacher = Teacher(nn.Identity(), 0.5, 4.0, torch.arange(10.0).unsqueeze(1), torch.Generator().manual_seed(0))
    batches = teacher.batches(4)
    first_pass = torch.cat([next(batches) for _ in range(2)])  # 10 inputs, batches of 4: two per pass
    assert len(set(first_pass.tolist())) == 8
    assert all(len(next(batches)) == 4 for _ in range(5))
    assert math.isfinite(float(softened_kl(torch.empty(0, 3), torch.empty(0, 3), 4.0)))


def test_progressive_distillation_loss_is_zero_for_the_guide_and_reaches_only_the_hybrid():
    from theseus_cli.training.alignment import output_distillation_loss

    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 5)
    hybrid = nn.Sequential(nn.Linear(5, 8), guide[1], guide[2])  # the first layer replaced, the rest the guide's
    task = get_task("classification")
    with torch.no_grad():
        g_out, h_out = guide(x), hybrid(x)
    assert float(output_distillation_loss(guide, guide, x, task, 4.0)) == pytest.approx(
        0.0, abs=f32_tolerance(kl_magnitude(g_out, g_out, 4.0), terms=3))
    loss = output_distillation_loss(guide, hybrid, x, task, 4.0)
    # KL ≈ 0.03 from terms of total size ≈ 40 (T² = 16): the float32 error is that of the terms, ~1e-5 relative
    tol = f32_tolerance(kl_magnitude(h_out, g_out, 4.0), terms=3)
    assert loss.shape == (1,) and float(loss) == pytest.approx(_reference_kl(h_out, g_out, 4.0), abs=tol)
    assert tol < 0.01 * float(loss)  # still tight enough to catch a wrong temperature factor or direction
    for p in guide.parameters():
        p.requires_grad_(False)
    loss.sum().backward()
    assert hybrid[0].weight.grad is not None and guide[0].weight.grad is None
