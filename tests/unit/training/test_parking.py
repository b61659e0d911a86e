"""The guide parked on disk while the target fine-tunes (runtime.park_guide): what is parked, that it comes back
bit for bit however fine-tuning ends, when auto parks, and that a conversion gives the same target either way."""

import io
import shutil
from collections import namedtuple

import pytest
import torch
from torch import nn

from theseus_cli.errors import OutputError
from theseus_cli.pipelines.convert import ConvertOptions, run_conversion
from theseus_cli.progress import LineProgress
from theseus_cli.training import parking
from theseus_cli.training.parking import PARK_DIR, park, parkable, parked_guide, plan_parking


def _pair():
    """A guide and a target that shares its first layer's tensors (as a LoRA hybrid shares the kept weights)."""
    guide = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    target = nn.Sequential(guide[0], nn.BatchNorm1d(6), nn.Linear(6, 2))
    return guide, target


def test_parkable_is_what_only_the_guide_holds_each_tensor_once_and_never_a_view():
    guide, target = _pair()
    found = {id(t) for t in parkable(guide, target)}
    assert found == {id(guide[1].weight), id(guide[1].bias), id(guide[1].running_mean), id(guide[1].running_var),
                     id(guide[1].num_batches_tracked), id(guide[2].weight), id(guide[2].bias)}
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight  # one tensor in two places: parked once
    assert len(parkable(tied, nn.Sequential())) == 1
    viewed = nn.Module()
    base = torch.randn(4, 3)
    viewed.register_buffer("whole", base)
    viewed.register_buffer("row", base[1])  # two tensors on one storage: neither is parked
    assert parkable(viewed, nn.Sequential()) == []


def test_parked_tensors_are_freed_while_parked_and_come_back_bit_for_bit(tmp_path):
    guide, target = _pair()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    shared = target[0].weight
    with parked_guide(guide, target, tmp_path, "always") as parked:
        assert parked.bytes == sum(t.numel() * t.element_size() for t in before.values()) - 4 * 6 * 4 - 6 * 4
        assert guide[2].weight.numel() == 0 and guide[1].running_var.numel() == 0  # freed, identity kept
        assert (tmp_path / PARK_DIR / "rank-0.bin").stat().st_size == parked.bytes
        assert target[0].weight is shared and target[0].weight.numel() == 24  # the target's own: untouched
    for key, value in guide.state_dict().items():
        assert torch.equal(value, before[key]) and value.dtype == before[key].dtype
    assert not (tmp_path / PARK_DIR).exists()
    assert parked.summary()["tensors"] == 7


def test_the_guide_comes_back_when_fine_tuning_fails(tmp_path):
    guide, target = _pair()
    before = guide[2].weight.clone()
    with pytest.raises(RuntimeError, match="diverged"):
        with parked_guide(guide, target, tmp_path, "always"):
            raise RuntimeError("diverged")
    assert torch.equal(guide[2].weight, before) and not (tmp_path / PARK_DIR).exists()


def test_a_bfloat16_guide_is_parked_as_its_own_bytes(tmp_path):
    weight = torch.randn(5, 7).to(torch.bfloat16)
    holder = nn.Linear(7, 5, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        holder.weight.copy_(weight)
    parked = park([holder.weight], tmp_path / "p.bin")
    assert (tmp_path / "p.bin").stat().st_size == 5 * 7 * 2
    parked.restore()
    assert holder.weight.dtype == torch.bfloat16 and torch.equal(holder.weight, weight)


def test_auto_parks_only_what_is_worth_it_and_always_refuses_a_full_disk(tmp_path, monkeypatch):
    small = [torch.zeros(10)]
    assert not plan_parking("auto", small, tmp_path / PARK_DIR)  # 40 bytes: held
    assert plan_parking("always", small, tmp_path / PARK_DIR)
    assert not plan_parking("never", small, tmp_path / PARK_DIR)
    monkeypatch.setattr(parking, "AUTO_MIN_BYTES", 40)
    assert plan_parking("auto", small, tmp_path / PARK_DIR)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(100, 90, 10))
    assert not plan_parking("auto", small, tmp_path / PARK_DIR)  # no room: auto holds the guide
    with pytest.raises(OutputError, match="runtime.park_guide: parking the guide needs"):
        plan_parking("always", small, tmp_path / PARK_DIR)


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_a_conversion_with_the_guide_parked_writes_the_same_target(tmp_path):
    from safetensors.torch import load_file

    from tests.unit.training.test_block_store import LLAMA, _recipe

    reports, targets = {}, {}
    for mode in ("never", "always"):
        recipe = _recipe(schedule={"kind": "progressive"}, align={"epochs": 1}, finetune={"peft": {"rank": 2}},
                         runtime={"park_guide": mode})
        out = tmp_path / mode
        lines = io.StringIO()
        reports[mode] = run_conversion(recipe, out, ConvertOptions(device="cpu", latency=False,
                                                                   progress=LineProgress(lines)))
        said = [line for line in lines.getvalue().splitlines() if "parked" in line]
        assert len(said) == (2 if mode == "always" else 0), said  # one line each way
        assert all(line.startswith(("parked ", "read the parked guide back")) for line in said)
        targets[mode] = load_file(out / "target.safetensors")
        assert not (out / PARK_DIR).exists()
    assert reports["never"]["finetune"]["parked_guide"] is None
    # what LoRA's hybrid does not share: the replaced attentions' q, k, v, o projections (float32, no biases),
    # which only the guide still runs, and the rotary tables (buffers: the hybrid holds copies of its own)
    width, kv = LLAMA["hidden_size"], LLAMA["hidden_size"] // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"]
    rotary = 2 * (LLAMA["hidden_size"] // LLAMA["num_attention_heads"] // 2)
    parked = reports["always"]["finetune"]["parked_guide"]
    assert parked["tensors"] == 2 * 4 + 2 and parked["bytes"] == 4 * (2 * (2 * width * width + 2 * width * kv) + rotary)
    assert targets["never"].keys() == targets["always"].keys()
    for key, value in targets["never"].items():  # one process: bit for bit
        assert torch.equal(value, targets["always"][key]), key
    assert reports["never"]["metric"] == reports["always"]["metric"]


def test_a_channels_last_weight_comes_back_in_its_layout(tmp_path):
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    before = conv.weight.detach().clone()
    parked = park(parkable(conv, nn.Sequential()), tmp_path / "p.bin")
    assert conv.weight.numel() == 0
    parked.restore()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and torch.equal(conv.weight, before)


def test_a_write_that_fails_frees_nothing_and_leaves_no_file(tmp_path, monkeypatch):
    guide, target = _pair()
    before = guide[2].weight.detach().clone()
    tensors = parkable(guide, target)
    real_write = parking._bytes_of
    calls = []

    def failing(t):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(t)

    monkeypatch.setattr(parking, "_bytes_of", failing)
    with pytest.raises(OSError, match="No space left"):
        park(tensors, tmp_path / PARK_DIR / "rank-0.bin")
    assert torch.equal(guide[2].weight, before) and not (tmp_path / PARK_DIR).exists()
