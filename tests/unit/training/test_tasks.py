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
