"""``runtime.fsdp`` under torchrun: guide and target sharded by block (FSDP2) on 2 gloo processes match one process,
and a sharded run killed between stages resumes from its shards to the same target."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.errors import RecipeError
from tests.conftest import HANG_S

RECIPE = {"task": "causal-lm", "seed": 0,
          # no dropout: random streams are per process, and this test compares numbers, not distributions
          "guide": {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16,
                                                   "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
          "data": {"source": "bible-kjv", "sequence_length": 16, "train_limit": 40, "test_limit": 12,
                   "batch_size": 10, "eval_batch_size": 8},
          "replace": [{"match": "GPT2Attention", "with": "linear_attention", "align_up": 1}],
          "align": {"epochs": 2, "lr": 3.0e-3}, "finetune": {"epochs": 1, "lr": 1.0e-3},
          "runtime": {"fsdp": True}}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# stops both ranks after the first stage's sharded checkpoint: the second stage raises before it trains
KILLED_AFTER_FIRST_STAGE = """
import sys
from theseus_cli.pipelines import convert
real = convert.align_stage
def align_stage(index, *args, **kwargs):
    if index == 1:
        raise SystemExit(3)
    return real(index, *args, **kwargs)
convert.align_stage = align_stage
sys.argv[0] = "theseus"
from theseus_cli.cli.app import main
main()
"""


def _run(cmd, cwd, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert (res.returncode == 0) == ok, res.stderr[-3000:]
    return json.loads(res.stdout) if ok else res


def test_two_sharded_processes_match_one_and_resume_from_their_shards(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (tmp_path / "killed.py").write_text(KILLED_AFTER_FIRST_STAGE)
    args = ["convert", "--recipe", "recipe.yaml", "--device", "cpu", "--json", "--no-latency"]
    one = _run([sys.executable, "-m", "theseus_cli", *args, "--out", "one"], tmp_path)
    two = _run([*TORCHRUN, "-m", "theseus_cli", *args, "--out", "two"], tmp_path)
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"} and one["distributed"]["world_size"] == 1
    for a, b in zip(one["stages"], two["stages"]):  # the gathered, exact-gradient similarity loss
        assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)
    assert two["finetune"]["epoch_losses"] == pytest.approx(one["finetune"]["epoch_losses"], abs=1e-5)
    for key in ("guide", "target_after_alignment", "target"):
        assert two["metric"][key] == pytest.approx(one["metric"][key], rel=1e-5)
    w1, w2 = load_file(tmp_path / "one" / "target.safetensors"), load_file(tmp_path / "two" / "target.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:  # float32 sums reduced in another order: a few ulps of weights of order 0.1–1
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["alignment.png", "report.json", "target.safetensors"]

    _run([*TORCHRUN, "killed.py", *args, "--out", "killed"], tmp_path, ok=False)
    shards = sorted(p.name for p in (tmp_path / "killed" / ".resume").iterdir())
    assert "sharded-stages-1" in shards and "stages.pt" in shards  # each rank's shards of the first stage's target
    resumed = _run([*TORCHRUN, "-m", "theseus_cli", *args, "--out", "killed", "--resume"], tmp_path)
    assert resumed["wall_time"]["resumed"]
    for a, b in zip(two["stages"], resumed["stages"], strict=True):  # stage 1 restored, stage 2 trained from it
        assert b["losses"] == pytest.approx(a["losses"], abs=1e-6)
    w3 = load_file(tmp_path / "killed" / "target.safetensors")
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], atol=1e-6, rtol=1e-5)


def test_what_sharding_does_not_do_yet_is_refused_with_its_field():
    for changes, message in (({"finetune": {"epochs": 1, "peft": {}}}, "finetune.peft"),
                             ({"schedule": {"kind": "blockwise"}}, "progressive, sequential or joint"),
                             ({"baseline": {"enabled": True}}, "baselines are not sharded")):
        with pytest.raises(RecipeError, match="runtime.fsdp"):
            parse_recipe({**RECIPE, **changes})
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**RECIPE, **changes})
