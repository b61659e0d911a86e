"""``theseus search``: goal-driven conversion (phase 1 on ONNX Runtime, phase 2 in an Optuna study)."""

from theseus_cli.pipelines.search.pipeline import Search, SearchOptions, run_search

__all__ = ["Search", "SearchOptions", "run_search"]
