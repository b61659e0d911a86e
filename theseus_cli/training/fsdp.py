"""Fully sharded conversion (``runtime.fsdp: true``) under ``torchrun``: guide and target sharded by block with
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), for guides that do not fit one device.

What changes against the data-parallel run (:mod:`theseus_cli.training.distributed`), and why:

* **Sharding.** Each block of guide and target (the elements of an ``nn.Sequential`` / ``nn.ModuleList`` that have
  layers: a decoder layer, a ResNet block; :func:`~theseus_cli.training.checkpointing.blocks`) and then the whole
  model are ``fully_shard``-ed: each rank holds 1/N of every weight, its gradient and AdamW state, and a block's
  weights are gathered only while it runs. Each rank builds the guide once in host memory before sharding it.
* **Replacements introduced up front.** Sharding fixes a model's modules, so every stage's replacements are built
  (each under its stage's seed, as the stage would) before the first stage, and stage *t* trains its own. A stage's
  loss reads only points at or before its deepest aligned module, which the later replacements do not reach, so the
  objective is the progressive one; a replacement whose start is measured on the hybrid (``init: activation_svd``)
  measures it before any stage has trained. One process with ``runtime.fsdp: true`` runs the same way unsharded,
  which is what a sharded run is compared with (tested: 2 gloo processes against 1, to float tolerance).
* **Whole forwards.** A stage's forwards run to the end (no early exit after the deepest aligned point): every rank
  must take part in every block's gather.
* **The exact full-batch gradient** is kept: each rank gathers every rank's activations and computes the same loss
  (:meth:`~theseus_cli.training.distributed.Dist.gather`); FSDP's reduce-scatter averages over ranks, so the loss
  is scaled by the world size (:func:`loss_scale`) to make it the sum the data-parallel path all-reduces.
* **Evaluation and similarity reports** run whole on every rank (each forward needs all ranks).
* **Checkpoints** are sharded: ``torch.distributed.checkpoint`` writes each rank's shards of the target into
  ``OUT/.resume/sharded-<phase>/`` (written beside, then renamed), the figures go into the usual files, and
  ``--resume`` loads the shards back into the sharded target, reading DCP's pickled ``.metadata`` with an unpickler
  that builds nothing but such metadata (:func:`read_checked_metadata`).
* **Writing.** Once trained, the full weights are gathered to rank 0 into unsharded copies of guide and target kept
  from before sharding (their parameters on the ``meta`` device until then, so they take no memory), which rank 0
  profiles and writes as any run's.

Not with ``finetune.peft``, ``finetune.checkpointing``, ``finetune.distill``, the ``blockwise`` / ``independent`` schedules, a reverse
order, progressive distillation, micro-batching, the guide cache, architecture transfers or baselines (refused
before any work).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from theseus_cli.errors import OutputError
from theseus_cli.training.distributed import current_dist


def loss_scale() -> float:
    """What a backward's loss is multiplied by: the world size under sharding (FSDP averages gradients over ranks;
    the data-parallel path sums them), else 1."""
    dist = current_dist()
    return float(dist.world) if dist.sharded else 1.0


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def shard_by_block(model: nn.Module) -> None:
    """``fully_shard`` each block of ``model`` (in place), then the model itself, over all ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from theseus_cli.training.checkpointing import blocks

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for _path, block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the ``meta`` device (no memory) and whose buffers are real copies
    (non-persistent ones, such as rotary tables, are not in any state dict): what rank 0 loads the gathered full
    weights into, with ``assign``."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo=memo)


def gathered(model: nn.Module, plain: nn.Module | None) -> nn.Module | None:
    """The full weights of the sharded ``model``, gathered (every rank must call this) into ``plain`` on rank 0
    (:func:`skeleton`); None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from theseus_cli.models.build import tied_aliases

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if plain is None:
        return None
    aliases = tied_aliases(plain)  # a head tied to the embedding: assign below gives each name its own tensor
    # each tensor its own storage (gathered tensors may be views of one buffer, which safetensors refuses to write)
    plain.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    for alias, name in aliases.items():
        owner, _, leaf = alias.rpartition(".")
        setattr(plain.get_submodule(owner), leaf, plain.get_parameter(name))
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain.eval()


def save_sharded(model: nn.Module, folder: Path) -> None:
    """Each rank's shards of ``model`` into ``folder`` (collective): written into ``folder`` + ``.tmp`` and renamed
    by rank 0 once every rank has written, so the folder is either a complete checkpoint or absent."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dist = current_dist()
    tmp = folder.with_name(folder.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.main:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    dist.barrier()


def load_sharded(model: nn.Module, folder: Path) -> None:
    """Load the shards :func:`save_sharded` wrote into the sharded ``model`` (collective), reading the checkpoint's
    metadata with :func:`checked_metadata_reader` (never a plain unpickling)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    read_checked_metadata(folder)  # refused here with its path; inside dcp.load an error would be wrapped
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=checked_metadata_reader(folder))
    set_model_state_dict(model, state["model"])


# what torch.distributed.checkpoint's metadata of a model's tensors is made of; nothing else is unpickled
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


def read_checked_metadata(folder: Path):
    """``folder``'s ``.metadata`` (a pickle, in ``torch.distributed.checkpoint``'s format), read by an unpickler that
    builds only the classes such metadata is made of (and torch's dtypes); refused (:class:`OutputError`, with the
    path) when it names anything else or holds an entry stored as pickled bytes, which DCP would ``torch.load``
    with ``weights_only=False`` (this module saves tensors only). A planted file then fails instead of running code,
    as every other resume file is read ``weights_only``."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / ".metadata"
    refuse = "; not loaded (remove the folder and rerun without --resume)"

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            allowed = name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            if not allowed:
                raise OutputError(f"{path}: refers to {module}.{name}, which a sharded checkpoint's metadata of "
                                  f"tensors never holds{refuse}")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable ({type(exc).__name__}){refuse}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise OutputError(f"{path}: not a sharded checkpoint's metadata{refuse}")
    return metadata


def checked_metadata_reader(folder: Path):
    """A ``FileSystemReader`` of ``folder`` whose metadata is read by :func:`read_checked_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_checked_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(str(folder))
