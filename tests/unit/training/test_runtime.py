"""Runtime choices (precision, memory format, data placement): resolved per device, and a run under each works."""

import pytest
import torch

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.pipelines.train_guide import train_guide
from theseus_cli.config.recipe import RuntimeConfig, parse_recipe
from theseus_cli.training.runtime import Runtime, current_runtime as current, resolve_runtime, using
from tests.conftest import tiny_recipe_dict


def test_auto_is_plain_fp32_on_cpu():
    rt = resolve_runtime(RuntimeConfig(), torch.device("cpu"))
    assert rt == Runtime("cpu", bf16=False, channels_last=False, data_on_device=False, compile=False)


def test_explicit_choices_are_honoured_and_context_scoped():
    rt = resolve_runtime(RuntimeConfig(precision="bf16", channels_last="on", data_on_device="on"), torch.device("cpu"))
    assert rt.bf16 and rt.channels_last and not rt.data_on_device  # the CPU is where the data already is
    assert current("cpu") == Runtime("cpu")
    with using(rt):
        assert current("cpu") is rt
        x = rt.batch(torch.randn(2, 3, 4, 4))
        assert x.is_contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
    assert current("cpu") == Runtime("cpu")


def test_conversion_under_bf16_and_channels_last_runs_and_saves(tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(runtime={"precision": "bf16", "channels_last": "on"}))
    guide = train_guide(recipe, tmp_path / "g.safetensors", epochs=1, device="cpu")
    assert guide["runtime"]["bf16"] and guide["runtime"]["channels_last"]
    report = run_conversion(recipe, tmp_path / "out", ConvertOptions(checkpoint=tmp_path / "g.safetensors", device="cpu", baseline=True))
    assert report["runtime"] == {"device": "cpu", "bf16": True, "channels_last": True, "data_on_device": False,
                                 "compile": False, "cast_cache": True, "align_batch_size": 64}
    assert all(torch.isfinite(torch.tensor(s["losses"])).all() for s in report["stages"])
    assert 0 <= report["metric"]["target"] <= 1 and 0 <= report["metric"]["baseline"] <= 1
    import theseus_cli

    assert sum(p.numel() for p in theseus_cli.load_target(tmp_path / "out").parameters()) == report["params"]["target"]


def test_conversion_with_micro_batched_alignment_matches_the_plain_one(tmp_path):
    plain = run_conversion(parse_recipe(tiny_recipe_dict()), tmp_path / "a", ConvertOptions(device="cpu"))
    sliced = run_conversion(parse_recipe(tiny_recipe_dict(align={"micro_batch_size": 16})), tmp_path / "b", ConvertOptions(device="cpu"))
    for a, b in zip(plain["stages"], sliced["stages"]):
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-4)


def test_compile_falls_back_to_eager_when_compilation_fails(tmp_path, monkeypatch):
    def broken_compile(model, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler for inductor")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    report = run_conversion(parse_recipe(tiny_recipe_dict(runtime={"compile": True})), tmp_path / "o", ConvertOptions(device="cpu"))
    assert report["finetune"]["compile"].startswith("fallback to eager: RuntimeError: no C++ compiler")
    assert report["runtime"]["compile"] is True and 0 <= report["metric"]["target"] <= 1
    off = run_conversion(parse_recipe(tiny_recipe_dict()), tmp_path / "p", ConvertOptions(device="cpu"))
    assert off["finetune"]["compile"] == "off"
    assert off["metric"] == report["metric"]  # the eager fallback trains exactly as a run without compile


def test_alignment_batch_is_larger_by_default_on_cuda_only():
    from theseus_cli.training.runtime import align_batch_size

    recipe = parse_recipe(tiny_recipe_dict())  # data.batch_size 64
    assert align_batch_size(recipe, torch.device("cpu")) == 64
    assert align_batch_size(recipe, torch.device("cuda")) == 1024
    pinned = parse_recipe(tiny_recipe_dict(align={"batch_size": 32}))
    assert align_batch_size(pinned, torch.device("cuda")) == 32
    from theseus_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="needs align.batch_size ≥ 4"):
        parse_recipe(tiny_recipe_dict(align={"batch_size": 2}, similarity={"kind": "ucka"}))
    # the similarity sees alignment's batches: fine-tuning's may be smaller (a large decoder's, for memory)
    assert parse_recipe(tiny_recipe_dict(align={"batch_size": 8}, data={"batch_size": 2})).data.batch_size == 2
