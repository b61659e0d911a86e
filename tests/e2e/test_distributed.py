"""torchrun data parallelism: 2 CPU processes on gloo match one process with the same global batch."""

import json
import os
import subprocess
import sys
import pytest
import torch
import yaml
from safetensors.torch import load_file

from theseus_cli.training.distributed import Dist
from tests.conftest import HANG_S, tiny_recipe_dict

@pytest.mark.parametrize("n,world", [(64, 2), (63, 2), (10, 3), (3, 3)])
def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one(n, world):
    shards = [Dist(r, world).shard(n) for r in range(world)]
    assert shards[0].start == 0 and shards[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_one_process_is_a_no_op():
    d = Dist()
    x = torch.randn(4, 3, requires_grad=True)
    assert d.gather(x, 4) is x and not d.enabled and d.main
    with d.synced_batchnorm(torch.nn.BatchNorm1d(3)):
        pass


def _run(cmd, tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("micro", [None, 20])
def test_two_gloo_processes_match_one_process(tmp_path, micro):
    # BatchNorm in the guide (frozen during alignment, trained in fine-tuning and the baseline), a batch of 63
    # (uneven shards 32 + 31), the naive baseline too: everything data-parallel has to get right; and the
    # exact micro-batched alignment step, whose slices run within each rank's shard
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(data={"batch_size": 63}, baseline={"enabled": True},
                                                      finetune={"epochs": 2}, align={"micro_batch_size": micro})))
    args = ["convert", "--recipe", str(recipe), "--device", "cpu", "--json"]
    one = _run([sys.executable, "-m", "theseus_cli", *args, "--out", "one"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # = torchrun
    two = _run([*torchrun, "-m", "theseus_cli", *args, "--out", "two"], tmp_path)
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"} and one["distributed"]["world_size"] == 1
    for a, b in zip(one["stages"], two["stages"]):
        assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)
    assert two["finetune"]["epoch_losses"] == pytest.approx(one["finetune"]["epoch_losses"], abs=1e-4)
    assert two["baseline"]["epoch_losses"] == pytest.approx(one["baseline"]["epoch_losses"], abs=1e-4)
    # the distill baseline's teacher batches are sharded too, each term weighted by its shard's share
    assert two["baselines"]["distill"]["epoch_losses"] == pytest.approx(one["baselines"]["distill"]["epoch_losses"],
                                                                        abs=1e-4)
    for key in ("target_after_alignment", "target", "baseline", "guide"):
        assert two["metric"][key] == pytest.approx(one["metric"][key], abs=0.011)  # at most one of 200 test images
    w1, w2 = load_file(tmp_path / "one" / "target.safetensors"), load_file(tmp_path / "two" / "target.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-4, rtol=1e-3)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["alignment.png", "report.json", "target.safetensors"]
