"""Run directories: one run at a time, checked writable first, invalidated before an overwrite, disk errors named."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.rundir import LOCK_FILE, run_directory
from tests.conftest import HANG_S, tiny_recipe_dict

runner = CliRunner()


def _recipe(tmp_path: Path, name: str = "r.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**sections)))
    return path


def _convert(recipe: Path, out: Path, *extra: str):
    return runner.invoke(app, ["convert", "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--json", *extra])


def _cli(args: list[str], preexec=None, wrap: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*wrap, sys.executable, "-m", "theseus_cli", *args], env=env, capture_output=True, text=True,
                          timeout=HANG_S, preexec_fn=preexec)


def test_a_failed_overwrite_never_looks_like_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert _convert(_recipe(tmp_path), out).exit_code == 0
    (out / "target.onnx").write_bytes(b"an export of the old target")
    bad = _recipe(tmp_path, "diverges.yaml", finetune={"lr": 1e25, "epochs": 2})
    res = _convert(bad, out, "--overwrite")
    assert res.exit_code == 9
    assert not (out / "report.json").exists() and not (out / "target.safetensors").exists()
    assert not (out / "target.onnx").exists()  # nothing of the other run is left to be mistaken for this one's
    ev = runner.invoke(app, ["eval", str(out)])
    assert ev.exit_code == 4 and "unfinished run" in ev.output


def test_a_second_run_into_a_locked_directory_exits_8_naming_the_first(tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path)
    with run_directory(out):  # this process holds the run directory, as a running conversion would
        assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
        res = _cli(["convert", "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--overwrite"])
        assert res.returncode == 8, res.stderr
        assert f"in use by another theseus run (pid {os.getpid()} on" in res.stderr
        assert res.stderr.count("\n") == 1
    assert not (out / LOCK_FILE).exists()  # released and removed with the run
    assert not any(out.iterdir())


def test_resuming_a_finished_run_redoes_nothing(tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path)
    first = _convert(recipe, out)
    assert first.exit_code == 0
    stamp = (out / "target.safetensors").stat().st_mtime_ns
    again = _convert(recipe, out, "--resume")
    assert again.exit_code == 0 and json.loads(again.stdout)["metric"] == json.loads(first.stdout)["metric"]
    assert (out / "target.safetensors").stat().st_mtime_ns == stamp
    other = _convert(_recipe(tmp_path, "other.yaml", seed=1), out, "--resume")
    assert other.exit_code == 8 and "finished run made for a different recipe" in other.output


def test_a_conversion_that_fails_before_writing_leaves_no_directory(tmp_path):
    recipe = _recipe(tmp_path, replace=[{"match": "Conv3d", "with": "lowrank_linear", "params": {"rank": 4}}])
    res = _convert(recipe, tmp_path / "new" / "run")
    assert res.exit_code == 5 and not (tmp_path / "new" / "run").exists()


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG instead of killing


def test_a_write_the_file_system_refuses_is_one_line_naming_the_path(tmp_path):
    """A file-size limit (no privileges needed) makes the checkpoint writes fail as a full disk would."""
    res = _cli(["convert", "--recipe", str(_recipe(tmp_path)), "--out", str(tmp_path / "run"), "--device", "cpu",
                "--quiet"], preexec=_limit_file_size)  # --quiet: no progress lines before the error
    assert res.returncode == 8, res.stderr[-2000:]
    line = res.stderr.strip()
    assert "\n" not in line and "cannot write: file too large" in line and str(tmp_path / "run") in line
    assert "internal error" not in line


def _namespace_with_tmpfs() -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (for real full / read-only disks)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True, timeout=HANG_S)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _namespace_with_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")


def _on_tmpfs(mount: Path, options: str) -> list[str]:
    mount.mkdir()
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {options} none "{mount}" && exec "$@"', "sh"]


@needs_tmpfs
@pytest.mark.parametrize("options,where,cause", [
    ("ro,size=1m", "run: ", "cannot write: read-only file system (EROFS)"),  # creating --out, before any work
    ("size=48k", "run/.resume/", "cannot write: no space left on the device (ENOSPC)"),  # a checkpoint, mid-run
])
def test_a_read_only_or_full_disk_is_one_line_naming_the_path(tmp_path, options, where, cause):
    disk = tmp_path / "disk"
    res = _cli(["convert", "--recipe", str(_recipe(tmp_path)), "--out", str(disk / "run"), "--device", "cpu", "--quiet"],
               wrap=_on_tmpfs(disk, options))
    assert res.returncode == 8, res.stderr[-2000:]
    line = res.stderr.strip()
    assert "\n" not in line and f"{disk}/{where}" in line and cause in line
