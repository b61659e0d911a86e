"""Task losses and metrics, checked against values worked out by hand."""

import math

import pytest
import torch
import torch.nn as nn

from theseus_cli.tasks import get_task, sentence_embedding
from theseus_cli.batch import TokenBatch
from theseus_cli.training.loops import evaluate
from tests.numeric import f32_tolerance


class FixedLogits(nn.Module):
    """Every position predicts the same distribution: softmax(row)."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, input_ids=None, attention_mask=None):
        ids = input_ids
        return self.row.expand(ids.shape[0], ids.shape[1], -1).clone()


# the mean NLL sums 3 log-softmax terms, each of size ≤ |logit| + logsumexp ≈ 3: its float32 error is absolute at that
# size, and exp() turns an absolute error of the NLL into the same relative error of the perplexity
NLL_TOL = f32_tolerance(3 * 3.0, terms=3)


def test_perplexity_matches_a_hand_computed_value():
    # p = softmax([0, ln 3, 0, 0]) = [1/6, 1/2, 1/6, 1/6]; sequence 0 1 2 1 predicts 1, 2, 1
    # NLL = ln 2 + ln 6 + ln 2 = ln 24 over 3 tokens → perplexity 24^(1/3)
    model = FixedLogits([0.0, math.log(3.0), 0.0, 0.0])
    x = torch.tensor([[0, 1, 2, 1]])
    ppl = evaluate(model, get_task("causal-lm"), x, None, 8, torch.device("cpu"))
    assert ppl == pytest.approx(24 ** (1 / 3), rel=NLL_TOL)  # logits are float32


def test_uniform_model_has_perplexity_equal_to_vocabulary_size_whatever_the_batch_size():
    model = FixedLogits([0.0] * 7)
    x = torch.randint(0, 7, (10, 9))
    for bs in (1, 3, 10):
        assert evaluate(model, get_task("causal-lm"), x, None, bs, torch.device("cpu")) == pytest.approx(7.0, rel=1e-12)


def test_padding_is_not_predicted_or_counted():
    model = FixedLogits([0.0, math.log(3.0), 0.0, 0.0])
    padded = TokenBatch(torch.tensor([[0, 1, 2, 1, 3, 3]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    ppl = evaluate(model, get_task("causal-lm"), padded, None, 8, torch.device("cpu"))
    assert ppl == pytest.approx(24 ** (1 / 3), rel=NLL_TOL)  # logits are float32
    loss = get_task("causal-lm").loss(model(padded.ids), padded, None)
    assert float(loss) == pytest.approx(math.log(24) / 3, abs=NLL_TOL)


def test_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    s, c = get_task("classification").metric_sums(logits, None, torch.tensor([0, 1, 1]))
    assert get_task("classification").finish(float(s), float(c)) == pytest.approx(2 / 3)


def test_sentence_embedding_is_the_masked_mean_normalised():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    x = TokenBatch(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))
    emb = sentence_embedding(hidden, x)
    assert torch.allclose(emb, torch.tensor([[2.0, 2.0]]) / math.sqrt(8.0))
    task = get_task("sentence-embedding")
    assert float(task.loss(hidden, x, emb)) == pytest.approx(0.0, abs=1e-6)
    s, c = task.metric_sums(hidden, x, -emb)
    assert task.finish(float(s), float(c)) == pytest.approx(-1.0)


def _reference_loss(logits: torch.Tensor, targets: torch.Tensor):
    """The plain mean cross-entropy and its gradient, in float64."""
    exact = logits.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(exact, targets, ignore_index=-100)
    loss.backward()
    return loss.detach(), exact.grad


@pytest.mark.parametrize("rows", [1, 5, 36])
def test_piecewise_next_token_loss_matches_the_float64_loss_and_gradient(rows):
    from theseus_cli.tasks import next_token_loss

    torch.manual_seed(0)
    logits = (torch.randn(37, 101) * 3).requires_grad_()
    targets = torch.randint(0, 101, (37,))
    targets[[3, 10, 36]] = -100
    loss, grad = _reference_loss(logits, targets)
    out = next_token_loss(logits, targets, rows=rows)
    (out * 2.5).backward()
    # each row's NLL is a log-softmax of logits of size ≤ 3·4 plus a logsumexp over 101 terms; the mean adds 34
    magnitude = float(logits.detach().abs().max() + logits.detach().double().logsumexp(-1).abs().max())
    assert abs(float(out) - float(loss)) <= f32_tolerance(magnitude, terms=34 + 101)
    # the gradient (softmax − one-hot) / count: entries ≤ 1/34, each from a handful of rounded operations
    assert torch.allclose(logits.grad.double() / 2.5, grad, rtol=0, atol=f32_tolerance(1.0 / 34, terms=101))
    assert torch.equal(logits.grad[[3, 10, 36]], torch.zeros(3, 101))  # ignored rows get no gradient


def test_piecewise_loss_keeps_the_logits_dtype_for_the_gradient_and_is_nan_with_nothing_to_predict():
    from theseus_cli.tasks import next_token_loss

    logits = torch.randn(6, 11, dtype=torch.bfloat16, requires_grad=True)
    next_token_loss(logits, torch.randint(0, 11, (6,)), rows=2).backward()
    assert logits.grad.dtype == torch.bfloat16
    assert math.isnan(float(next_token_loss(torch.randn(6, 11), torch.full((6,), -100), rows=2)))


def test_a_loss_of_one_piece_is_the_plain_cross_entropy_bit_for_bit():
    from theseus_cli.tasks import next_token_loss

    logits, targets = torch.randn(9, 13), torch.randint(0, 13, (9,))
    assert torch.equal(next_token_loss(logits, targets), torch.nn.functional.cross_entropy(logits, targets))


def test_perplexity_summed_in_pieces_equals_the_whole_sum(monkeypatch):
    import theseus_cli.tasks as tasks

    torch.manual_seed(1)
    logits, x = torch.randn(3, 8, 17), torch.randint(0, 17, (3, 8))
    whole = tasks.get_task("causal-lm").metric_sums(logits, x, None)
    monkeypatch.setattr(tasks, "PIECE_ELEMENTS", 17 * 2)  # two rows per piece
    assert tasks.piece_rows(logits.reshape(-1, 17)) == 2
    pieces = tasks.get_task("causal-lm").metric_sums(logits, x, None)
    assert float(pieces[1]) == float(whole[1]) == 21
    # float64 sums of 21 terms of size ≤ 3 + log 17 + |logit|: the order of summation moves the last bits only
    assert float(pieces[0]) == pytest.approx(float(whole[0]), rel=1e-13)


def test_the_task_loss_takes_the_pieces_where_the_logits_are_wider_than_one(monkeypatch):
    import theseus_cli.tasks as tasks

    torch.manual_seed(2)
    logits, x = torch.randn(2, 6, 9, requires_grad=True), torch.randint(0, 9, (2, 6))
    plain = tasks.get_task("causal-lm").loss(logits, x, None)
    monkeypatch.setattr(tasks, "PIECE_ELEMENTS", 9 * 3)
    pieces = tasks.get_task("causal-lm").loss(logits, x, None)
    assert pieces.grad_fn.name().startswith("PiecewiseCrossEntropy")
    magnitude = float(logits.detach().abs().max() + logits.detach().double().logsumexp(-1).abs().max())
    assert abs(float(pieces) - float(plain)) <= f32_tolerance(magnitude, terms=10 + 9)
