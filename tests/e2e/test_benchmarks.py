"""Smoke runs of the benchmark scripts at toy sizes (their real figures come from full runs, docs/BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import HANG_S, REPO


def _bench(script: str, tmp_path, *args: str, ci: bool = True) -> subprocess.CompletedProcess:
    """Run ``bench/<script> ARGS --out tmp_path`` (with ``CI=true`` unless ``ci`` is False); it must exit 0."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "CI": "true"} if ci else None)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_gpu_throughput_benchmark_runs_small_on_cpu(tmp_path):
    _bench("gpu_alignment_throughput.py", tmp_path, "--small", "--device", "cpu", ci=False)
    row = json.loads((tmp_path / "gpu_alignment_throughput.json").read_text())["rows"][0]
    assert row["aligned_points"] == 20 and row["alignment"] > 0 and row["plain"] > 0
    assert row["ratio"] == row["alignment"] / row["plain"]


def test_gpu_conversion_time_benchmark_runs_small_on_cpu(tmp_path):
    _bench("gpu_conversion_time.py", tmp_path, "--small", "--device", "cpu", ci=False)
    result = json.loads((tmp_path / "gpu_conversion_time.json").read_text())
    assert result["full"]["stages"] == 20 and 0 <= result["full"]["target"] <= 1
    assert [r["stages"] for r in result["scaling"]] == [1, 1, 5, 5, 20, 20]


def test_transport_benchmark_runs_small_and_recovers_a_tuned_in_the_widened_copy(tmp_path):
    run = _bench("task_vector_transport.py", tmp_path, "--small", "--device", "cpu", "--settings", "w-to-1.5w,w-to-widened-copy")
    rows = {r["setting"]: r for r in json.loads((tmp_path / "task_vector_transport.json").read_text())["rows"]}
    assert set(rows) == {"w-to-1.5w", "w-to-widened-copy"} and "SMOKE RUN" in run.stdout
    copy = rows["w-to-widened-copy"]
    # an exact map exists, so B′ at α = 1 is A′; α is chosen from a 0.1-step grid on 100 validation digits, and which
    # grid point wins depends on float32 kernels (α 1.1 with AVX2, 1.2 with ATen's default ones, where B′ scored
    # 0.548 against A′'s 0.527): "A′ recovered" is B′ at least as good as A′, up to 2 points
    assert copy["B_transported"] >= copy["A_tuned"] - 0.02
    assert min(copy["map_quality"].values()) > 0.99


def test_deployment_cost_benchmark_runs_on_two_settings(tmp_path):
    _bench("deployment_cost.py", tmp_path, "--device", "cpu", "--settings", "fmnist-resnet-to-mlp,resnet50-to-resnet18-small")
    rows = {r["setting"]: r for r in json.loads((tmp_path / "deployment_cost.json").read_text())["rows"]}
    transfer = rows["resnet50-to-resnet18-small"]["ratios"]
    assert transfer["params"] < 0.6 and transfer["flops"] < 0.6  # the transfer target is smaller
    assert rows["fmnist-resnet-to-mlp"]["ratios"]["params"] > 10  # the MLP target is not


def test_distillation_benchmark_runs_small_over_two_seeds(tmp_path):
    run = _bench("distillation.py", tmp_path, "--small", "--device", "cpu", "--settings", "demo", "--seeds", "0,1")
    row = json.loads((tmp_path / "distillation.json").read_text())["rows"][0]
    assert row["seeds"] == [0, 1] and set(row["values"]) == {"scratch", "distill", "progressive-kd", "not", "not-kd-ft"}
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in row["values"].values())
    # the seeds change the conversion, not the guide or the data
    assert row["values"]["not"][0] != row["values"]["not"][1] or row["values"]["scratch"][0] != row["values"]["scratch"][1]
    assert "best: " in run.stdout and " ± " in run.stdout and "SMOKE RUN" in run.stdout


def test_lora_benchmark_runs_small_and_fine_tunes_fewer_parameters(tmp_path):
    run = _bench("lora.py", tmp_path, "--small", "--device", "cpu", "--seeds", "0")
    row = json.loads((tmp_path / "lora.json").read_text())["rows"][0]
    assert row["metric_name"] == "perplexity" and all(row[k] > 1 for k in ("full", "lora", "scratch", "distill"))
    assert 0 < row["lora_trained_params"] < row["full_trained_params"] and row["lora_modules"] > 0
    assert "NoT, LoRA" in run.stdout and "SMOKE RUN" in run.stdout


def test_blockwise_benchmark_runs_small_beside_progressive_and_the_baselines(tmp_path):
    run = _bench("blockwise.py", tmp_path, "--small", "--device", "cpu", "--seeds", "0")
    row = json.loads((tmp_path / "blockwise.json").read_text())["rows"][0]
    assert all(row[k] > 1 for k in ("progressive", "blockwise", "scratch", "distill", "blockwise_aligned"))
    assert row["store_bytes"] > 0 and row["blockwise_align_steps"] == row["align_steps"]
    assert "blockwise: aligned" in run.stdout and "SMOKE RUN" in run.stdout


def test_llm_memory_benchmark_measures_each_piece_in_its_own_process(tmp_path):
    _bench("llm_memory.py", tmp_path, "--small", "--only", "blockwise-block,end-to-end", "--samples", "24",
           "--tokens", "16")
    result = json.loads((tmp_path / "llm_memory.json").read_text())
    block, e2e = result["rows"]
    assert block["steps"] == 3 and block["store"]["bytes"] > 0 and block["peak_rss_bytes"] > block["baseline_rss_bytes"]
    assert e2e["trained_params"] < result["facts"]["target_params"] and e2e["store"]["samples"] == 24
    assert e2e["bound"]["bound_bytes"] == 1.3 * 2 * result["facts"]["guide_params"] + 16 * e2e["trained_params"]


def _bench_module(name: str):
    """bench/<name>.py as a module (the benchmark scripts import each other from their own folder)."""
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def _bench_common():
    return _bench_module("common")


def test_seed_aggregation_gives_mean_and_sample_std_and_marks_single_seeds():
    common = _bench_common()
    aggregate_seeds, pm, with_seed = common.aggregate_seeds, common.pm, common.with_seed
    rows = [{"setting": "s", "not": v, "wall_time": {"total": 2.0 * v}, "ok": True} for v in (0.5, 0.7, 0.9)]
    row = aggregate_seeds(rows, [0, 1, 2])
    assert row["not"] == pytest.approx(0.7) and row["std"]["not"] == pytest.approx(0.2)
    assert row["wall_time"]["total"] == pytest.approx(1.4) and row["ok"] is True and row["per_seed"] == rows
    assert pm(row, "not") == "0.7000 ± 0.2000" and pm(rows[0], "not") == "0.5000 (1 seed)"
    from theseus_cli.config.recipe import parse_recipe
    from tests.conftest import tiny_recipe_dict

    recipe = with_seed(parse_recipe(tiny_recipe_dict(seed=0)), 5)
    assert recipe.seed == 5 and recipe.data.seed == 0


def test_corpus_tokenizer_is_a_deterministic_loadable_bpe_of_the_asked_size(tmp_path):
    from theseus_cli.data.text import load_tokenizer

    common = _bench_common()
    first = common.corpus_tokenizer(320, cache=tmp_path / "a")
    again = common.corpus_tokenizer(320, cache=tmp_path / "b")
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob("*/*.partial"))  # staged, then renamed
    tok = load_tokenizer(str(first))
    verse = "In the beginning God created the heaven and the earth."
    ids = tok(verse, add_special_tokens=False)["input_ids"]
    assert len(tok) == 320 and max(ids) < 320 and tok.decode(ids) == verse
    assert len(ids) < len(verse)  # merges learned from the corpus, not bytes only
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_guide_cache_key_ignores_what_train_guide_does_not_read(tmp_path, monkeypatch):
    from theseus_cli.config.recipe import parse_recipe
    from tests.conftest import tiny_recipe_dict

    common = _bench_common()
    trained = []

    def fake_train_guide(recipe, out, **_):
        trained.append(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"weights")
        return {"metric": "accuracy", "accuracy": 0.5}

    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "train_guide", fake_train_guide)
    raw = tiny_recipe_dict(seed=0)
    a, _ = common.cached_guide("g", parse_recipe(raw), 1, 1e-3, "cpu")
    b, info = common.cached_guide("g", parse_recipe({**raw, "align": {"epochs": 3}}), 1, 1e-3, "cpu")
    c, _ = common.cached_guide("g", parse_recipe({**raw, "data": {**raw["data"], "train_limit": 64}}), 1, 1e-3, "cpu")
    assert a == b and info["cached"] and len(trained) == 2 and c != a  # the data changes the guide; align does not
    full = common.full_data_guide({**raw, "data": {**raw["data"], "train_limit": 64, "label_limit": 8}})
    assert full["data"]["train_limit"] is None and full["data"]["label_limit"] is None and full["seed"] == 0


def test_cpu_gpt2_settings_shrink_the_guide_and_train_it_on_all_data_except_in_smoke_runs(monkeypatch):
    common = _bench_common()
    monkeypatch.setattr(common, "corpus_tokenizer", lambda: REPO / "bpe")
    spec = {"recipe": "recipes/gpt2_attention_to_rnn.yaml", "override": {"data": {"train_limit": 1000}},
            "cpu_gpt2": True, "guide_data": "all"}
    raw = common.setting_raw(spec)
    kwargs = raw["guide"]["kwargs"]
    assert (kwargs["n_embd"], kwargs["vocab_size"], kwargs["eos_token_id"]) == (64, common.CPU_BPE_VOCAB, 0)
    assert raw["data"]["tokenizer"] == str(REPO / "bpe") and raw["data"]["train_limit"] == 1000
    assert raw["replace"][0]["with"] == "elman_rnn"  # the recipe's conversion stays
    assert common.guide_raw(spec, raw, small=False)["data"]["train_limit"] is None
    assert common.guide_raw(spec, raw, small=True)["data"]["train_limit"] == 1000
    plain = {"recipe": spec["recipe"]}
    assert common.setting_raw(plain)["guide"]["kwargs"]["n_embd"] == 256
    assert common.guide_raw(plain, {"seed": 3}, small=False) == {"seed": 0}


@pytest.mark.parametrize("names", [("resnet18-separable", "resnet18-separable-kd", "resnet18-mobilenetv3"),
                                   ("gpt2-edge-1000-cpu", "gpt2-edge-cpu")], ids=["resnet18", "cpu-gpt2"])
def test_edge_settings_of_one_family_convert_one_guide(names, monkeypatch):
    """The ResNet-18 rows compare edge targets of one ResNet-18, the CPU GPT-2 rows few and all data for one GPT-2:
    their guides must hit one cache entry (same name, same fields that train-guide reads)."""
    from theseus_cli.config.recipe import parse_recipe

    common, edge = _bench_common(), _bench_module("edge")
    monkeypatch.setattr(common, "corpus_tokenizer", lambda: REPO / "bpe")
    paths = set()
    for name in names:
        spec = edge.SETTINGS[name]
        raw = edge.raw_recipe(spec, seed=2, small=False)
        recipe = parse_recipe(common.guide_raw(spec, raw, small=False))
        paths.add(common.guide_cache_path(spec["guide_name"], recipe, spec["guide_epochs"]))
    assert len(paths) == 1
    assert edge.raw_recipe(edge.SETTINGS["resnet18-separable"], 0, False)["replace"][0]["with"] == "separable_conv"
    full = edge.raw_recipe(edge.SETTINGS["gpt2-edge-cpu"], 0, False)
    assert "train_limit" not in full["data"] and full["align"]["max_steps_per_epoch"] == 15  # all data, capped steps
    assert "train_limit" not in edge.raw_recipe(edge.SETTINGS["minilm-edge-all"], 0, False)["data"]  # as shipped
    assert "minilm-edge-all" not in common.settings_parser("edge", edge.SETTINGS, "x").parse_args([]).settings.split(",")


def test_edge_benchmark_runs_small_and_measures_every_file_on_onnxruntime(tmp_path):
    run = _bench("edge.py", tmp_path, "--small", "--device", "cpu", "--settings", "cnn-separable", "--seeds", "0")
    row = json.loads((tmp_path / "edge.json").read_text())["rows"][0]
    assert row["setting"] == "cnn-separable" and row["small"] is True
    assert row["target_params"] < row["guide_params"] and row["target_flops"] < row["guide_flops"]
    for who in ("guide", "target"):
        assert row[f"{who}_fp32_b1_ms"] > 0 and 0 <= row[f"{who}_fp32_metric"] <= 1
        # int8 either measured or refused with its reason, never silently missing
        assert row[f"{who}_int8_b1_ms"] > 0 or who in row["int8_refused"]
        # sizes measured, not compared: on a graph this small QDQ nodes can outweigh the saved weight bytes
        assert row[f"{who}_fp32_size_bytes"] > 0 and (row[f"{who}_int8_size_bytes"] > 0 or who in row["int8_refused"])
    # speed-ups are per-round ratios of files timed alternately: each median lies inside its own range
    assert row["speed_fp32_min"] <= row["speed_fp32"] <= row["speed_fp32_max"] and row["timing_rounds"] >= 3
    assert "goal: ×" in run.stdout and "SMOKE RUN" in run.stdout and "timed alternately" in run.stdout


def test_latency_ratio_benchmark_times_a_conversions_files_alternately(tmp_path):
    run = _bench("latency_ratios.py", tmp_path, "--small", "--settings", "cnn-separable", "--threads", "1")
    timing = json.loads((tmp_path / "latency_ratios.json").read_text())["rows"][0]["timings"][0]
    assert timing["threads"] == 1 and timing["rounds"] >= 3
    assert {"guide_fp32_b1_ms", "target_fp32_b1_ms"} <= set(timing)  # a smoke run times the float files only
    assert timing["speed_fp32_min"] <= timing["speed_fp32"] <= timing["speed_fp32_max"]
    assert "SMOKE RUN" in run.stdout


def test_lowrank_start_benchmark_runs_small_and_the_activation_weighted_start_is_closer(tmp_path):
    """The MiniLM feed-forward layers at half rank, before any training: the SVD weighted by the layers' inputs keeps
    more of the guide's embeddings than the plain SVD (the full run: docs/BENCHMARKS.md)."""
    run = _bench("lowrank_start.py", tmp_path, "--small", "--device", "cpu", "--ratios", "0.5", "--calibration-seeds", "0")
    row = json.loads((tmp_path / "lowrank_start.json").read_text())["rows"][0]
    (cell,) = row["cells"]
    assert row["guide"] == pytest.approx(1.0) and cell["params"] < row["guide_params"]
    assert cell["activation_svd"][0] > cell["svd"] + 0.05, cell
    assert "SMOKE RUN" in run.stdout and "activation_svd" in run.stdout


def test_streaming_benchmark_runs_small_and_reports_every_model(tmp_path):
    _bench("streaming.py", tmp_path, "--lengths", "6,12", "--batches", "2", "--rerun-max", "6", "--max-positions", "32",
           "--rounds", "2")  # two rounds: one in each order
    rows = json.loads((tmp_path / "streaming.json").read_text())["rows"]
    seen = {(r["model"], r["tokens"]) for r in rows}
    assert seen == {(m, n) for m in ("guide+kv", "rnn-stream", "linattn-stream", "rnn-ort-step") for n in (6, 12)} | {("rnn-rerun", 6)}
    by = {(r["model"], r["tokens"]): r for r in rows}
    # what the benchmark is about: the KV cache grows with the text, a state does not
    assert by[("guide+kv", 12)]["cache_bytes"] > by[("guide+kv", 6)]["cache_bytes"] > 0
    assert by[("rnn-stream", 12)]["cache_bytes"] == by[("rnn-stream", 6)]["cache_bytes"] == by[("rnn-ort-step", 12)]["cache_bytes"] > 0
    assert all(r["ms_per_token"] > 0 for r in rows) and "cache/state bytes" in (tmp_path / "streaming.md").read_text()
    # every model ran in each of the alternating rounds; its speed-up is a per-round median inside its range
    assert all(r["rounds"] == 2 and r["speedup_vs_guide"]["min"] <= r["speedup_vs_guide"]["median"]
               <= r["speedup_vs_guide"]["max"] for r in rows)
    assert by[("guide+kv", 6)]["speedup_vs_guide"]["median"] == 1.0


def test_stage_grouping_benchmark_runs_small_and_compares_at_equal_alignment_steps(tmp_path):
    run = _bench("stage_grouping.py", tmp_path, "--small", "--device", "cpu", "--seeds", "0")
    row = json.loads((tmp_path / "stage_grouping.json").read_text())["rows"][0]
    assert (row["per-module_stages"], row["grouped_stages"], row["grouped-equal-steps_stages"]) == (39, 11, 11)
    assert row["grouped_align_steps"] == 11 < row["per-module_align_steps"] == 39
    # the equal-budget variant gets the per-module total, up to rounding to whole steps per stage
    assert abs(row["grouped-equal-steps_align_steps"] - row["per-module_align_steps"]) <= row["grouped_stages"]
    assert {b: row["baselines"][b]["steps"] for b in ("scratch", "distill")} == {"scratch": row["per-module_steps"],
                                                                               "distill": row["per-module_steps"]}
    assert "(seed 0 only)" in run.stdout and "SMOKE RUN" in run.stdout


@pytest.mark.parametrize("setting", ["resnet18", "minilm", "gpt2-cpu"])
def test_search_benchmark_writes_valid_search_files_on_its_edge_recipes(setting, tmp_path):
    """Each family's search file (bench/search.py) validates, on the hand-written edge recipe of bench/edge.py as its
    base, at full size and in a smoke run's; the run itself is in docs/BENCHMARKS.md."""
    from theseus_cli.config.search import load_search

    bench = _bench_module("search")
    for small in (False, True):
        path, _ = bench.write_search(setting, bench.SETTINGS[setting], tmp_path / str(small), small)
        search, base = load_search(path)
        assert search.goals.max_latency_ratio == 0.5 and base.replace
        assert base.baseline.enabled is False and base.data.seed == 0
