"""Faults: divergence stops cleanly and restores, out-of-memory suggests what fits, signals and kills resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

from theseus_cli.errors import DeviceError, TrainingError
from theseus_cli.training.faults import largest_fitting
from theseus_cli.surgery.schedule import Stage
from theseus_cli.config.recipe import AlignConfig
from theseus_cli.similarity import make_loss
from theseus_cli.tasks import get_task
from theseus_cli.training import AlignJob, TaskJob, align_stage, train_task
from tests.conftest import HANG_S, tiny_recipe_dict

CPU = torch.device("cpu")


def _pair():
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    target = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    return guide, target


def _stage():
    return Stage(introduced=["2"], trained=["0", "2"], aligned=["0", "2"], feed="target")


def test_diverging_alignment_stops_restores_and_names_the_module():
    guide, target = _pair()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    cka = make_loss("cka")
    calls = []

    def loss(t, g):  # the second aligned point (module "2") goes NaN from the third step on
        calls.append(1)
        out = cka(t, g)
        return out * float("nan") if len(calls) > 4 and len(calls) % 2 == 0 else out

    with pytest.raises(TrainingError) as err:
        align_stage(0, guide, target, _stage(), torch.randn(64, 8), AlignJob(AlignConfig(epochs=1, lr=1e-2), loss, 16,
                    torch.Generator().manual_seed(0), CPU))
    msg = str(err.value)
    assert "first at module '2'" in msg and "restored" in msg and "align.lr" in msg and err.value.exit_code == 9
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # back to the state before the bad epoch


class _Blowup(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_diverging_fine_tuning_stops_and_restores():
    torch.manual_seed(0)
    model = _Blowup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with pytest.raises(TrainingError) as err:
        train_task(model, get_task("classification"), x, y, TaskJob(8, 1e25, 0.0, 0, None, 0.0, 16,
                   torch.Generator().manual_seed(0), CPU, "fine-tune target"))
    assert "fine-tune target: the task loss became non-finite" in str(err.value)
    assert "first at module" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_divergence_is_exit_9_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from theseus_cli.cli.app import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(finetune={"lr": 1e25, "epochs": 2})))
    res = CliRunner().invoke(app, ["convert", "--recipe", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert res.exit_code == 9 and "became non-finite" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "report.json").exists()  # no half-finished run is presented as a result
    assert (tmp_path / "o" / ".resume" / "phase.pt").is_file()  # the aligned target is kept for --resume


class _Greedy(nn.Module):
    """Runs out of (pretend) memory on batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.lin, self.limit = nn.Linear(8, 8), limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows")
        return self.lin(x)


def test_largest_fitting_halves_until_it_fits():
    tried = []

    def attempt(n):
        tried.append(n)
        if n > 12:
            raise torch.OutOfMemoryError("out of memory")

    assert largest_fitting(100, attempt) == 12 and tried == [50, 25, 12]
    assert largest_fitting(4, lambda n: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))) is None
    with pytest.raises(ValueError):  # anything but out-of-memory is not swallowed
        largest_fitting(8, lambda n: (_ for _ in ()).throw(ValueError("bug")))


def test_alignment_out_of_memory_suggests_the_micro_batch_that_fits():
    guide = nn.Sequential(nn.Linear(8, 8)).eval()
    target = nn.Sequential(_Greedy(16))
    stage = Stage(introduced=["0"], trained=["0"], aligned=["0"], feed="target")
    with pytest.raises(DeviceError) as err:
        align_stage(0, guide, target, stage, torch.randn(64, 8), AlignJob(AlignConfig(epochs=1), make_loss("cka"), 64,
                    torch.Generator().manual_seed(0), CPU))
    assert "out of memory" in str(err.value) and "set align.micro_batch_size: 16" in str(err.value)
    assert err.value.exit_code == 7
    assert all(p.grad is None for p in target.parameters())  # the probe left nothing behind


def test_fine_tuning_out_of_memory_suggests_a_batch_size():
    model = nn.Sequential(_Greedy(10), nn.Linear(8, 3))
    with pytest.raises(DeviceError, match=r"set data.batch_size: 8 "):
        train_task(model, get_task("classification"), torch.randn(64, 8), torch.randint(0, 3, (64,)), TaskJob(4, 1e-3, 0.0, 0,
                   None, 0.0, 32, torch.Generator().manual_seed(0), CPU, "fine-tune target"))


# ------------------------------------------------------------------ real processes: signals and kills

SLOW = tiny_recipe_dict(align={"epochs": 3, "max_steps_per_epoch": 6}, finetune={"epochs": 3},
                        baseline={"enabled": True})


def _cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "theseus_cli", "convert", "--recipe", str(recipe), "--out", str(out),
            "--device", "cpu", "--quiet", "--json", *extra]


def _env():
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("faults")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(SLOW))
    res = subprocess.run(_cmd(recipe, tmp / "full"), env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-2000:]
    return recipe, tmp / "full", json.loads(res.stdout)


def _same_run(out: Path, full: Path, report: dict) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["alignment.png", "report.json", "target.safetensors"]
    got = json.loads((out / "report.json").read_text())
    assert got["metric"] == report["metric"]
    a, b = load_file(out / "target.safetensors"), load_file(full / "target.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_boundary_and_the_run_resumes(reference, tmp_path, sig, code):
    recipe, full, report = reference
    out = tmp_path / "o"
    proc = subprocess.Popen(_cmd(recipe, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S  # progress (the first stage's checkpoint) decides when to signal, not a clock
    while not (out / ".resume" / "stages.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == code, stderr[-2000:]
    line = stderr.strip()
    assert "\n" not in line and f"stopped by {sig.name}" in line and "--resume" in line and "Traceback" not in line
    assert not (out / "report.json").exists() and stdout == ""
    res = subprocess.run(_cmd(recipe, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-2000:]
    _same_run(out, full, report)


def _files_are_whole(out: Path) -> None:
    """After a kill every file present is complete: the old or the new one, never a torn one."""
    if (out / "report.json").exists():
        json.loads((out / "report.json").read_text())
    if (out / "target.safetensors").exists():
        load_file(out / "target.safetensors")
    for f in (out / ".resume").glob("*.pt") if (out / ".resume").is_dir() else []:
        torch.load(f, weights_only=True)


def _progress(out: Path) -> set:
    """The points a run resumes from (each stage or phase checkpoint) and its end (report.json), by name, mtime and
    size: a killed run repeats whatever came after its last checkpoint, so only these count as progress."""
    marks = set()
    for f in [out / "report.json", *((out / ".resume").glob("*.pt"))] if out.is_dir() else []:
        try:
            st = f.stat()
        except FileNotFoundError:  # removed by the run between the listing and the look
            continue
        marks.add((f.name, st.st_mtime_ns, st.st_size))
    return marks


def _wait_for_progress(proc: subprocess.Popen, out: Path, before: set) -> None:
    """Until the run writes a checkpoint it had not written before this attempt, or ends (a hang fails)."""
    deadline = time.monotonic() + HANG_S
    while proc.poll() is None and not (_progress(out) - before):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run made no progress (hung)")
        time.sleep(0.02)


def test_killed_at_random_moments_it_resumes_to_the_same_result(reference, tmp_path):
    """SIGKILL at random moments, each after the attempt has finished one more step than the last (so every
    attempt moves the run on however slow the machine is), then --resume until it finishes."""
    recipe, full, report = reference
    out = tmp_path / "o"
    rng = random.Random(1234)
    kills = 0
    for _attempt in range(40):  # far more than the run has checkpoints: each killed attempt wrote a new one
        before = _progress(out)
        proc = subprocess.Popen(_cmd(recipe, out, "--resume"), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        _wait_for_progress(proc, out, before)
        if proc.poll() is None and kills:  # the first kill comes right after the first checkpoint, so there is one
            time.sleep(rng.uniform(0.0, 0.5))  # then random moments into the next step: mid-stage, mid-write, mid-report
        if proc.poll() is None:
            proc.kill()  # SIGKILL: no handler runs, no cleanup
            proc.wait()
            kills += 1
            _files_are_whole(out)
            continue
        assert proc.wait() == 0, proc.stderr.read()[-2000:]
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 1
    _same_run(out, full, report)


def test_first_signal_asks_to_stop_and_a_second_stops_at_once():
    from theseus_cli.training.faults import Interrupted, check_stop, graceful_stop

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with graceful_stop():
        check_stop("nothing yet")  # no request: nothing happens
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(Interrupted) as err:
            check_stop("alignment stage 1 (0)")
        assert err.value.exit_code == 143 and "stopped by SIGTERM after a finished step of alignment stage 1" in str(err.value)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers put back


def test_a_signal_stops_evaluation_and_embedding_after_their_current_batch():
    """Passes that are not training steps (on a large corpus the guide's sentence embeddings take minutes) stop at
    the next batch too, not after them."""
    from theseus_cli.training.faults import Interrupted, graceful_stop
    from theseus_cli.training.loops import embed, evaluate

    model, x, y = nn.Linear(8, 3).eval(), torch.randn(64, 8), torch.randint(0, 3, (64,))
    seen = []
    model.register_forward_hook(lambda *_: seen.append(1))
    with graceful_stop():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(Interrupted, match="after a finished batch of evaluation"):
            evaluate(model, get_task("classification"), x, y, 8, CPU)
        assert len(seen) == 1  # one batch of eight, not all of them
        with pytest.raises(Interrupted, match="after a finished batch of the guide's sentence embeddings"):
            embed(nn.Identity(), torch.randn(64, 4, 8), 8, CPU)  # token states (B, T, D) pooled to (B, D)
