"""Helpers shared by the benchmark scripts: device description and cached guides."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from theseus_cli.pretrain import train_guide  # noqa: E402
from theseus_cli.recipe import Recipe  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    model = platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, {torch.get_num_threads()} torch threads)"


def cached_guide(name: str, recipe: Recipe, epochs: int, lr: float, device: str) -> tuple[Path, dict]:
    """Train the recipe's guide once per (name, recipe hash, epochs); later calls reuse the file."""
    cache = ROOT / ".cache" / "bench" / f"{name}-{recipe.digest()[:12]}-e{epochs}.safetensors"
    started = time.perf_counter()
    if cache.is_file():
        return cache, {"cached": True, "epochs": epochs, "seconds": 0.0}
    info = train_guide(recipe, cache, epochs=epochs, lr=lr, device=device)
    return cache, {"cached": False, "epochs": epochs, "seconds": time.perf_counter() - started, info["metric"]: info[info["metric"]]}
