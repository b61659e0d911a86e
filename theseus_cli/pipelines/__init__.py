"""One module per verb that trains: ``convert`` (:class:`Conversion`, phase by phase), ``search`` (a subpackage:
phase 1 on ONNX Runtime, phase 2 in an Optuna study, the winner), ``train-guide``, ``inspect``."""

from theseus_cli.pipelines.convert import Conversion, ConvertOptions, run_conversion
from theseus_cli.pipelines.inspect import inspect_guide
from theseus_cli.pipelines.search import Search, SearchOptions, run_search
from theseus_cli.pipelines.train_guide import train_guide

__all__ = ["Conversion", "ConvertOptions", "Search", "SearchOptions", "inspect_guide", "run_conversion", "run_search",
           "train_guide"]
