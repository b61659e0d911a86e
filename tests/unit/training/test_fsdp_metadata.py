"""A sharded checkpoint's metadata (a pickle in torch.distributed.checkpoint's format) is read by an unpickler that
builds nothing but that metadata: a planted file is refused with its path instead of running code."""

import os
import pickle
import warnings

import pytest
import torch

from theseus_cli.errors import OutputError
from theseus_cli.training.fsdp import checked_metadata_reader, read_checked_metadata


def _saved(folder):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "n": torch.tensor(3)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process: DCP says it assumes so
        dcp.save(state, checkpoint_id=str(folder))
    return state


def _load(folder):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=checked_metadata_reader(folder))
    return state


def test_a_checkpoint_this_module_writes_loads_through_the_checked_reader(tmp_path):
    saved = _saved(tmp_path / "ck")
    loaded = _load(tmp_path / "ck")
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value) and loaded["model"][key].dtype == value.dtype


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo planted > planted.txt",))


def test_a_planted_metadata_is_refused_with_its_path_and_runs_nothing(tmp_path, monkeypatch):
    _saved(tmp_path / "ck")
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Planted()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"ck/\.metadata: refers to (posix|os)\.system"):
        read_checked_metadata(tmp_path / "ck")
    assert not (tmp_path / "planted.txt").exists()


def test_an_entry_stored_as_pickled_bytes_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _saved(tmp_path / "ck")
    path = tmp_path / "ck" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.state_dict_metadata["model.w"] = BytesStorageMetadata()  # would be torch.load-ed with weights_only=False
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(OutputError, match=r"ck/\.metadata: refers to torch.distributed.checkpoint.metadata.Bytes"):
        read_checked_metadata(tmp_path / "ck")
    (tmp_path / "ck" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(OutputError, match=r"ck/\.metadata: unreadable"):
        read_checked_metadata(tmp_path / "ck")
