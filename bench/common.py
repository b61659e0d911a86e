"""Helpers shared by the benchmark scripts: device description and cached guides."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from theseus_cli.pipelines.train_guide import train_guide  # noqa: E402
from theseus_cli.config.recipe import Recipe  # noqa: E402


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


def settings_parser(doc: str, settings: dict, default_out: str) -> argparse.ArgumentParser:
    """--settings (those without ``"default": False`` by default), --device, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--settings", default=",".join(k for k, v in settings.items() if v.get("default", True)),
                        help=f"comma-separated, from: {', '.join(settings)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "runs" / default_out))
    return parser


def run_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: dict, name: str,
                 run_one: Callable[[str, dict, Path], dict], markdown: Callable[[list, str], str]) -> None:
    """Run each chosen setting (``run_one(setting, spec, out_root)`` returns its row), then write
    ``<out>/<name>.json`` (date, device, command, rows) and ``<out>/<name>.md`` and print the table."""
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in settings]
    if unknown:
        parser.error(f"unknown settings {unknown} (valid: {', '.join(settings)})")
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in names:
        rows.append(run_one(setting, settings[setting], out_root))
        print(f"{setting}: done ({rows[-1]['wall_time']['total']:.0f}s)", file=sys.stderr, flush=True)
    dev = device_name(args.device)
    result = {"date": datetime.date.today().isoformat(), "device": dev, "command": " ".join(sys.argv), "rows": rows}
    (out_root / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, dev)
    (out_root / f"{name}.md").write_text(table)
    print(table)
