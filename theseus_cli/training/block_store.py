"""Block-wise alignment's store (``schedule.kind: blockwise``): each aligned block's inputs and the guide's outputs
there, computed in one pass of the guide and kept on disk, so that each block's replacement then trains with only
that block running.

Layout, inside the run's output directory (``OUT/.blocks/``, removed when the run finishes)::

    .blocks/index.json                    written last: its presence marks a complete pass (with the run's fingerprint)
    .blocks/<point>/00000000.safetensors  one shard per pass batch: the per-sample arguments of the block's call
                                          and the guide's output there, rows = samples
    .blocks/<point>/shared.safetensors    arguments that are the same for every sample (positions, rotary tables)

How a block is called is recorded from the guide's own call, argument by argument: tensors whose first axis is the
batch are stored per sample; other tensors (batch axis 1: position ids, rotary ``cos``/``sin``) once, and every later
batch must pass the same values; ``None``, booleans, numbers and strings as they are; tuples and lists element by
element. Anything else (a cache object, a module) is refused with the block's path: such a block cannot be replayed
from disk, and the progressive schedule applies. A block whose input is the previous block's output (a decoder's
layer stack) stores it once: the input is read from the previous block's output rows.

Shards are read memory-mapped (``safetensors``' ``safe_open``): a training batch reads only its rows. The tensors
keep the dtype the guide ran in (bfloat16 under ``runtime.precision: bf16``). The pass refuses to start storing more
than ``schedule.max_store_gb`` (default: 90 % of the disk's free space), with the size it would need.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from theseus_cli.artifacts import atomic_write
from theseus_cli.batch import run_model
from theseus_cli.errors import OutputError, TrainingError
from theseus_cli.models.hooks import first_tensor
from theseus_cli.progress import NullProgress, Progress

BLOCKS_DIR = ".blocks"
INDEX_FILE = "index.json"
FREE_DISK_FRACTION = 0.9
PLAIN = (type(None), bool, int, float, str)


class _Stop(Exception):
    pass


@dataclass
class _PointLayout:
    """How one block's call is stored: ``spec`` mirrors its (args, kwargs) with leaves ``{"sample": key}``,
    ``{"shared": key}``, ``{"alias": point}`` (the previous block's output) or ``{"value": v}``."""

    spec: dict[str, Any]
    sample_keys: list[str] = field(default_factory=list)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    bytes: int = 0


def _encode(value, key: str, batch: int, length: int, layout: _PointLayout, alias: str | None, where: str):
    """The spec of one argument (and, for a tensor, whether it is stored per sample or once)."""
    if isinstance(value, torch.Tensor):
        if alias is not None:
            return {"alias": alias}
        per_sample = value.dim() > 0 and value.shape[0] == batch and not (value.dim() == 1 and value.shape[0] == length)
        if per_sample:
            layout.sample_keys.append(key)
            return {"sample": key}
        layout.shared[key] = value.detach().cpu().contiguous()
        return {"shared": key}
    if isinstance(value, PLAIN):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        return {"seq": [_encode(v, f"{key}.{i}", batch, length, layout, None, where) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    raise TrainingError(f"schedule.kind: blockwise: {where} is called with {key} of type {type(value).__name__}, which "
                        "cannot be stored on disk; use schedule.kind: progressive")


def _leaves(value, spec: dict) -> list[tuple[dict, Any]]:
    """(spec leaf, value) pairs of one call, in the spec's order."""
    if "seq" in spec:
        return [pair for v, s in zip(value, spec["seq"]) for pair in _leaves(v, s)]
    return [(spec, value)]


def _decode(spec: dict, sample: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], aliases: dict[str, torch.Tensor]):
    if "seq" in spec:
        items = [_decode(s, sample, shared, aliases) for s in spec["seq"]]
        return tuple(items) if spec["tuple"] else items
    if "sample" in spec:
        return sample[spec["sample"]]
    if "shared" in spec:
        return shared[spec["shared"]]
    if "alias" in spec:
        return aliases[spec["alias"]]
    return spec["value"]


def _folder(point: str) -> str:
    return point.replace("/", "_") or "_root"


class BlockStore:
    """The stored inputs and outputs of the aligned blocks; :meth:`write` fills it in one guide pass, :meth:`fetch`
    reads a batch of rows for one block."""

    def __init__(self, root: Path, n_samples: int, points: list[str]):
        self.root, self.n, self.points = Path(root), n_samples, list(points)
        self.shard_rows = 0
        self.layouts: dict[str, _PointLayout] = {}
        self.seconds = 0.0

    # ------------------------------------------------------------------ the guide pass

    def write(self, guide: nn.Module, x, batch: int, device, autocast, fingerprint: dict, max_bytes: int | None,
              progress: Progress | None = None) -> None:
        """One pass of ``guide`` over ``x`` in batches of ``batch``; a complete store of the same run is reused."""
        if self.load(fingerprint):
            return
        progress = progress or NullProgress()
        started = time.perf_counter()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.shard_rows, self.layouts = batch, {}
        bar = progress.task("guide pass: block inputs to disk", (self.n + batch - 1) // batch)
        for start in range(0, self.n, batch):
            calls = self._run(guide, x[start:start + batch].to(device), autocast)
            if not self.layouts:
                self._lay_out(calls, min(batch, self.n))
            written = self._write_shard(start, calls)
            if start == 0:  # refuse a pass that would not fit, before writing the rest of it
                self._refuse_if_too_big(written, max_bytes)
            bar.advance()
        bar.done(line=False)
        for point, layout in self.layouts.items():
            if layout.shared:
                save_file(layout.shared, str(self.root / _folder(point) / "shared.safetensors"))
        self.seconds = time.perf_counter() - started
        index = {"fingerprint": fingerprint, "n": self.n, "shard_rows": self.shard_rows, "seconds": self.seconds,
                 "points": {p: {"spec": lay.spec, "sample_keys": lay.sample_keys, "bytes": lay.bytes}
                            for p, lay in self.layouts.items()}}
        atomic_write(self.root / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index)))

    def _run(self, guide: nn.Module, xb, autocast) -> dict[str, tuple]:
        """The guide's (args, kwargs, output) at every point for one batch, stopping after the deepest."""
        calls: dict[str, tuple] = {}
        deepest = self.points[-1]

        def hook_for(point):
            def hook(_module, args, kwargs, output):
                calls[point] = (args, kwargs, first_tensor(output).detach())
                if point == deepest:
                    raise _Stop
            return hook

        handles = [guide.get_submodule(p).register_forward_hook(hook_for(p), with_kwargs=True) for p in self.points]
        try:
            with torch.no_grad(), autocast():
                run_model(guide, xb)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [p for p in self.points if p not in calls]
        if missing:
            raise TrainingError(f"schedule.kind: blockwise: modules not reached in the guide's forward: {', '.join(missing)}")
        return calls

    def _alias(self, calls: dict, point: str) -> str | None:
        """The earlier point whose output is this point's first argument (the same memory and shape), if any."""
        args = calls[point][0]
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        for earlier in self.points[:self.points.index(point)]:
            output = calls[earlier][2]  # detached: another tensor object over the same memory
            if output.data_ptr() == args[0].data_ptr() and output.shape == args[0].shape:
                return earlier
        return None

    def _lay_out(self, calls: dict, batch: int) -> None:
        for point in self.points:
            args, kwargs, output = calls[point]
            primary = args[0] if args and isinstance(args[0], torch.Tensor) else output
            length = primary.shape[1] if primary.dim() > 1 else -1
            layout = _PointLayout({})
            alias = self._alias(calls, point)
            layout.spec = {"args": [_encode(a, f"arg.{i}", batch, length, layout, alias if i == 0 else None, point)
                                    for i, a in enumerate(args)],
                           "kwargs": {k: _encode(v, f"kw.{k}", batch, length, layout, None, point)
                                      for k, v in kwargs.items()}}
            layout.sample_keys.append("output")
            self.layouts[point] = layout
            (self.root / _folder(point)).mkdir()

    def _per_sample(self, point: str, call: tuple) -> dict[str, torch.Tensor]:
        """The per-sample tensors of one call (checking that the shared ones did not change)."""
        args, kwargs, output = call
        layout, found = self.layouts[point], {"output": output}
        specs = [*layout.spec["args"], *layout.spec["kwargs"].values()]
        values = [*args, *kwargs.values()]
        for spec, value in (pair for v, s in zip(values, specs) for pair in _leaves(v, s)):
            if "sample" in spec:
                found[spec["sample"]] = value
            elif "shared" in spec and not torch.equal(value.detach().cpu(), layout.shared[spec["shared"]]):
                raise TrainingError(f"schedule.kind: blockwise: {point}'s argument {spec['shared']} differs between "
                                    "batches but has no batch axis, so it cannot be stored once; use schedule.kind: "
                                    "progressive")
        return {k: v.detach().cpu().contiguous() for k, v in found.items()}

    def _write_shard(self, start: int, calls: dict) -> int:
        written = 0
        for point in self.points:
            tensors = self._per_sample(point, calls[point])
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            written += size
            self.layouts[point].bytes += size
            path = self.root / _folder(point) / f"{start:08d}.safetensors"
            atomic_write(path, lambda tmp, t=tensors: save_file(t, str(tmp)))
        return written

    def _refuse_if_too_big(self, first_shard: int, max_bytes: int | None) -> None:
        shared = sum(t.numel() * t.element_size() for lay in self.layouts.values() for t in lay.shared.values())
        need = shared + first_shard * self.n / min(self.shard_rows, self.n)
        free = shutil.disk_usage(self.root).free + first_shard
        limit = max_bytes if max_bytes is not None else int(FREE_DISK_FRACTION * free)
        if need > limit:
            shutil.rmtree(self.root, ignore_errors=True)
            what = "schedule.max_store_gb" if max_bytes is not None else f"{FREE_DISK_FRACTION:.0%} of the free disk"
            raise OutputError(f"{self.root}: block-wise alignment would store {need / 2**30:.2f} GiB of block inputs "
                              f"({self.n:,} samples), over {what} ({limit / 2**30:.2f} GiB); lower data.train_limit "
                              "or raise schedule.max_store_gb")

    def load(self, fingerprint: dict) -> bool:
        """Take over a complete store written by the same run (a resumed conversion)."""
        try:
            index = json.loads((self.root / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return False
        if index.get("fingerprint") != fingerprint or index.get("n") != self.n or list(index["points"]) != self.points:
            return False
        self.shard_rows, self.seconds = index["shard_rows"], index.get("seconds", 0.0)
        self.layouts = {}
        for point, entry in index["points"].items():
            shared_file = self.root / _folder(point) / "shared.safetensors"
            shared = {}
            if shared_file.is_file():
                with safe_open(str(shared_file), "pt") as f:
                    shared = {k: f.get_tensor(k) for k in f.keys()}
            self.layouts[point] = _PointLayout(entry["spec"], entry["sample_keys"], shared, entry["bytes"])
        return True

    # ------------------------------------------------------------------ reading

    @property
    def bytes(self) -> int:
        return sum(lay.bytes + sum(t.numel() * t.element_size() for t in lay.shared.values())
                   for lay in self.layouts.values())

    def summary(self) -> dict[str, Any]:
        return {"root": str(self.root), "samples": self.n, "bytes": self.bytes, "seconds": self.seconds,
                "per_point_bytes": {p: lay.bytes for p, lay in self.layouts.items()}}

    def _rows(self, point: str, keys: list[str], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` (in that order) of ``keys`` from ``point``'s shards, each shard read memory-mapped."""
        order = torch.argsort(idx)
        ordered = idx[order]
        shards = ordered // self.shard_rows
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for shard in torch.unique_consecutive(shards).tolist():
            local = ordered[shards == shard] - shard * self.shard_rows
            lo, hi = int(local[0]), int(local[-1]) + 1
            path = self.root / _folder(point) / f"{shard * self.shard_rows:08d}.safetensors"
            with safe_open(str(path), "pt") as f:
                for key in keys:
                    parts[key].append(f.get_slice(key)[lo:hi][local - lo])
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order))
        return {k: torch.cat(v)[back] for k, v in parts.items()}

    def fetch(self, point: str, idx: torch.Tensor, device) -> tuple[tuple, dict, torch.Tensor]:
        """(args, kwargs) of ``point``'s call for samples ``idx`` and the guide's output there, on ``device``."""
        idx = idx.detach().cpu()
        layout = self.layouts[point]
        sample = {k: v.to(device) for k, v in self._rows(point, layout.sample_keys, idx).items()}
        aliases = {}
        for spec in layout.spec["args"][:1]:
            if "alias" in spec:
                aliases[spec["alias"]] = self._rows(spec["alias"], ["output"], idx)["output"].to(device)
        shared = {k: v.to(device) for k, v in layout.shared.items()}
        args = tuple(_decode(s, sample, shared, aliases) for s in layout.spec["args"])
        kwargs = {k: _decode(s, sample, shared, aliases) for k, s in layout.spec["kwargs"].items()}
        return args, kwargs, sample["output"]
