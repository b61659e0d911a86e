"""Smoke runs of the benchmark scripts at toy sizes (their real figures come from full runs, docs/BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import HANG_S, REPO


def test_gpu_throughput_benchmark_runs_small_on_cpu(tmp_path):
    script = REPO / "bench" / "gpu_alignment_throughput.py"
    run = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads((tmp_path / "gpu_alignment_throughput.json").read_text())["rows"][0]
    assert row["aligned_points"] == 20 and row["alignment"] > 0 and row["plain"] > 0
    assert row["ratio"] == row["alignment"] / row["plain"]


def test_gpu_conversion_time_benchmark_runs_small_on_cpu(tmp_path):
    script = REPO / "bench" / "gpu_conversion_time.py"
    run = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_conversion_time.json").read_text())
    assert result["full"]["stages"] == 20 and 0 <= result["full"]["target"] <= 1
    assert [r["stages"] for r in result["scaling"]] == [1, 1, 5, 5, 20, 20]


def test_transport_benchmark_runs_small_and_recovers_a_tuned_in_the_widened_copy(tmp_path):
    root = REPO
    run = subprocess.run([sys.executable, str(root / "bench" / "task_vector_transport.py"), "--small", "--device", "cpu",
                          "--settings", "w-to-1.5w,w-to-widened-copy", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "CI": "true"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["setting"]: r for r in json.loads((tmp_path / "task_vector_transport.json").read_text())["rows"]}
    assert set(rows) == {"w-to-1.5w", "w-to-widened-copy"} and "SMOKE RUN" in run.stdout
    copy = rows["w-to-widened-copy"]
    assert copy["B_transported"] == pytest.approx(copy["A_tuned"], abs=0.02)  # an exact map exists: A′ recovered
    assert min(copy["map_quality"].values()) > 0.99


def test_deployment_cost_benchmark_runs_on_two_settings(tmp_path):
    root = REPO
    run = subprocess.run([sys.executable, str(root / "bench" / "deployment_cost.py"), "--device", "cpu", "--settings",
                          "fmnist-resnet-to-mlp,resnet50-to-resnet18-small", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "CI": "true"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["setting"]: r for r in json.loads((tmp_path / "deployment_cost.json").read_text())["rows"]}
    transfer = rows["resnet50-to-resnet18-small"]["ratios"]
    assert transfer["params"] < 0.6 and transfer["flops"] < 0.6  # the transfer target is smaller
    assert rows["fmnist-resnet-to-mlp"]["ratios"]["params"] > 10  # the MLP target is not
