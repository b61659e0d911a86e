"""The guide parked on disk while the target fine-tunes (``runtime.park_guide``).

Fine-tuning never runs the guide (unless it is the teacher of ``finetune.distill``), yet a conversion holds it
throughout, because the similarity report, the guide's metric and the deployment profile need it afterwards. For a
large guide that is memory the fine-tuning peak pays for nothing:

* a target that is a copy of the guide (full fine-tuning) or another architecture: the whole guide, one model's
  weights beside the target's weights, gradients and AdamW state;
* a hybrid that shares the guide's frozen tensors (``finetune.peft``): the replaced modules' weights, which only the
  guide still uses — a Llama's attention projections are about a sixth of it.

Parking writes every guide tensor the target does not share to one file, ``OUT/.parked/rank-N.bin``, frees it (the
tensor keeps its identity, its ``.data`` becomes an empty placeholder, so anything that runs the guide by mistake
fails loudly on a shape, never silently on stale numbers), and reads it back once fine-tuning is done. The file is
raw bytes, written and read by the same process, with the layout (dtype, shape, offset of each tensor) kept in
memory: nothing read from it decides what is read, and it is removed after. A killed run leaves the folder in an
unfinished run directory; the next run of that directory removes it.

What is parked: each tensor (parameter or buffer) of the guide whose storage the target does not use and which is
the only tensor on its storage and fills it (a view of another tensor stays, so no aliasing is ever broken), in
whatever layout (a channels-last weight comes back channels-last), on the CPU or an accelerator (read back to where
it was). ``auto`` parks when that is at least :data:`AUTO_MIN_BYTES` and the disk has
room for it with :data:`DISK_MARGIN` to spare; ``always`` parks whatever the size and refuses (exit 8) when the disk
has no room; ``never`` holds the guide as before. Writing at disk speed costs seconds per gigabyte, against a
fine-tuning that takes minutes to hours at that size.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from theseus_cli.errors import OutputError
from theseus_cli.progress import NullProgress, Progress, seconds
from theseus_cli.resources import gib

PARK_DIR = ".parked"
AUTO_MIN_BYTES = 64 * 2**20  # below this a guide is cheap to hold: auto leaves it in memory
DISK_MARGIN = 1.1  # the disk must have the bytes plus 10 %: parking must not be what fills it


@dataclass(frozen=True)
class _Slot:
    tensor: torch.Tensor  # the guide's own tensor object (a Parameter or a buffer), whose .data is swapped
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # kept: a channels-last weight comes back channels-last
    device: torch.device
    offset: int
    nbytes: int


@dataclass
class ParkedGuide:
    """What :func:`park` wrote: the file, each tensor's place in it, and what it took."""

    path: Path
    slots: list[_Slot] = field(default_factory=list)
    write_seconds: float = 0.0
    read_seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    def summary(self) -> dict:
        return {"bytes": self.bytes, "tensors": len(self.slots), "write_seconds": round(self.write_seconds, 3),
                "read_seconds": round(self.read_seconds, 3)}

    def restore(self) -> None:
        """Every parked tensor read back into fresh memory on its device; the file removed."""
        started = time.perf_counter()
        with open(self.path, "rb") as f:
            for slot in self.slots:
                host = torch.empty_strided(slot.shape, slot.stride, dtype=slot.dtype)
                f.seek(slot.offset)
                if f.readinto(_bytes_of(host).numpy()) != slot.nbytes:
                    raise OutputError(f"{self.path}: the parked guide was cut short (changed on disk while fine-tuning)")
                slot.tensor.data = host.to(slot.device)
        self.path.unlink()
        _remove_empty(self.path.parent)
        self.read_seconds = time.perf_counter() - started


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The memory of a CPU tensor that covers its whole storage, as flat uint8 (the same memory: no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes(),))


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def parkable(guide: nn.Module, target: nn.Module) -> list[torch.Tensor]:
    """The guide's tensors that can be parked: not on the meta device, storage not used by ``target``, alone on
    their storage (one tensor object filling all of it, in any dense layout), in the order the guide lists them."""
    kept = {_storage(t) for t in _tensors(target)}
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in _tensors(guide):
        ptr = _storage(t)
        if ptr is not None and t.numel() > 0:
            by_storage.setdefault(ptr, []).append(t)
    found = []
    for ptr, tensors in by_storage.items():
        t = tensors[0]  # dense (contiguous in some order of its dimensions) when it fills its storage exactly
        alone = len(tensors) == 1 and t.storage_offset() == 0 \
            and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        if ptr not in kept and alone:
            found.append(t)
    return found


def _storage(t: torch.Tensor) -> int | None:
    """The address of a plain tensor's storage; None for what has none to park (the meta device, a tensor
    subclass such as FSDP's sharded ``DTensor``, a storage FSDP has freed)."""
    if t.device.type == "meta" or type(t.data) is not torch.Tensor:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every distinct parameter and buffer object of ``model`` (a tied weight once)."""
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None:
                seen.setdefault(id(t), t)
    return list(seen.values())


def park(tensors: list[torch.Tensor], path: Path) -> ParkedGuide:
    """Write ``tensors`` to ``path`` one at a time (no second copy of them all in memory), then free them."""
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    parked = ParkedGuide(path)
    offset = 0
    try:
        with open(path, "wb") as f:
            for t in tensors:
                host = t.detach().cpu()  # the same strides (a dense tensor's layout is kept by the copy)
                nbytes = host.numel() * host.element_size()
                f.write(memoryview(_bytes_of(host).numpy()))
                parked.slots.append(_Slot(t, t.dtype, tuple(t.shape), tuple(host.stride()), t.device, offset, nbytes))
                offset += nbytes
    except BaseException:  # a full disk, an interrupt: nothing was freed yet, and no partial file stays
        path.unlink(missing_ok=True)
        _remove_empty(path.parent)
        raise
    for slot in parked.slots:
        slot.tensor.data = torch.empty(0, dtype=slot.dtype, device=slot.device)
    parked.write_seconds = time.perf_counter() - started
    return parked


def plan_parking(mode: str, tensors: list[torch.Tensor], folder: Path) -> bool:
    """Whether ``mode`` parks ``tensors`` in ``folder``: ``auto`` when they are large enough and fit the disk with
    room to spare; ``always`` when there is anything, refusing (exit 8) when the disk has no room."""
    if mode == "never" or not tensors:
        return False
    needed = sum(t.numel() * t.element_size() for t in tensors)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    fits = free >= needed * DISK_MARGIN
    if mode == "always" and not fits:
        raise OutputError(f"runtime.park_guide: parking the guide needs {gib(needed)} on the disk of {folder} and "
                          f"{gib(free)} is free; free some or set runtime.park_guide: never")
    return fits and (mode == "always" or needed >= AUTO_MIN_BYTES)


@contextlib.contextmanager
def parked_guide(guide: nn.Module, target: nn.Module, out: Path, mode: str, rank: int = 0,
                 progress: Progress | None = None) -> Iterator[ParkedGuide | None]:
    """While the block runs, the guide's tensors that ``target`` does not share are on disk (see the module
    docstring); yields the :class:`ParkedGuide` (its summary fills in once read back), or None where nothing is
    parked. They are read back however the block ends, so an error inside it leaves a whole guide. ``progress``
    gets a line each way."""
    progress = progress or NullProgress()
    folder = out / PARK_DIR
    tensors = parkable(guide, target) if mode != "never" else []
    if not plan_parking(mode, tensors, folder):
        _remove_empty(folder)
        yield None
        return
    parked = park(tensors, folder / f"rank-{rank}.bin")
    from theseus_cli.training.memory import release_freed_memory

    release_freed_memory()  # the freed weights were large blocks in the heap: hand them back now
    progress.log(f"parked {parked.bytes / 2**20:,.0f} MiB of the guide's weights ({len(parked.slots):,} tensors) "
                 f"on disk while fine-tuning, {seconds(parked.write_seconds)}")
    try:
        yield parked
    finally:
        parked.restore()
    progress.log(f"read the parked guide back, {seconds(parked.read_seconds)}")


def clear_parked(out: Path, rank: int = 0) -> None:
    """A killed run's parked file of this rank, removed (its guide is rebuilt from the recipe on resume)."""
    (out / PARK_DIR / f"rank-{rank}.bin").unlink(missing_ok=True)
    _remove_empty(out / PARK_DIR)
