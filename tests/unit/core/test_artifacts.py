import os
import stat

import pytest

from theseus_cli.artifacts import atomic_write, read_target_metadata, write_json
from theseus_cli.rundir import run_directory
from theseus_cli.errors import ModelError, OutputError


def test_atomic_write_replaces_whole_file_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'  # the old file, not a torn one
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_output_dir_rules(tmp_path):
    with run_directory(tmp_path / "new", overwrite=False):
        pass
    assert (tmp_path / "new").is_dir()
    (tmp_path / "new" / "x").write_text("1")
    with pytest.raises(OutputError, match="not empty"):
        with run_directory(tmp_path / "new", overwrite=False):
            pass
    with run_directory(tmp_path / "new", overwrite=True):
        pass
    (tmp_path / "file").write_text("1")
    with pytest.raises(OutputError, match="not a directory"):
        with run_directory(tmp_path / "file", overwrite=True):
            pass


def test_reading_something_that_is_not_a_target(tmp_path):
    with pytest.raises(ModelError, match="target file not found"):
        read_target_metadata(tmp_path)
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(1)}, str(tmp_path / "target.safetensors"))
    with pytest.raises(ModelError, match="not a theseus target"):
        read_target_metadata(tmp_path)


def test_leftovers_of_killed_writes_are_removed_and_resume_needs_a_run(tmp_path):
    import pytest

    from theseus_cli.errors import OutputError

    out = tmp_path / "run"
    (out / ".resume").mkdir(parents=True)
    (out / ".resume" / "stages.pt").write_bytes(b"x")
    (out / ".target.safetensors.k3j2.tmp").write_bytes(b"torn")
    (out / ".resume" / ".stages.pt.a1.tmp").write_bytes(b"torn")
    with run_directory(out, overwrite=False, resume=True):
        pass
    assert sorted(p.name for p in out.rglob("*")) == [".resume", "stages.pt"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="holds no theseus run"):
        with run_directory(other, overwrite=False, resume=True):
            pass
    assert (other / "notes.txt").read_text() == "keep"
