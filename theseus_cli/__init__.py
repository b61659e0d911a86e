"""theseus: convert a trained PyTorch model into another architecture (Network of Theseus).

The library's public API (the CLI is a thin layer over it)::

    from theseus_cli import ConvertOptions, load_recipe, run_conversion, load_target
    report = run_conversion(load_recipe("recipe.yaml"), "runs/x", ConvertOptions(device="cpu", baseline=True))
    model = load_target("runs/x")

Names are imported on first use, so ``import theseus_cli`` stays cheap and the subpackages can import
``__version__`` from here without a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_recipe": "theseus_cli.config.recipe",
    "Recipe": "theseus_cli.config.recipe",
    "run_conversion": "theseus_cli.pipelines.convert",
    "ConvertOptions": "theseus_cli.pipelines.convert",
    "ExportOptions": "theseus_cli.deploy.export",
    "Conversion": "theseus_cli.pipelines.convert",
    "run_search": "theseus_cli.pipelines.search",
    "SearchOptions": "theseus_cli.pipelines.search",
    "load_search": "theseus_cli.config.search",
    "load_transport_recipe": "theseus_cli.config.transport",
    "run_transport": "theseus_cli.transport.run",
    "TransportOptions": "theseus_cli.transport.run",
    "load_target": "theseus_cli.artifacts",
    "TargetMeta": "theseus_cli.target_meta",
    "evaluate_model": "theseus_cli.deploy.evaluate",
    "export_target": "theseus_cli.deploy.export",
    "train_guide": "theseus_cli.pipelines.train_guide",
    "TheseusError": "theseus_cli.errors",
    "TheseusWarning": "theseus_cli.errors",
    "LineProgress": "theseus_cli.progress",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'theseus_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
