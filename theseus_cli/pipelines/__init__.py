"""One module per verb that trains: ``convert`` (:class:`Conversion`, phase by phase), ``train-guide``,
``inspect``."""

from theseus_cli.pipelines.convert import Conversion, ConvertOptions, run_conversion
from theseus_cli.pipelines.inspect import inspect_guide
from theseus_cli.pipelines.train_guide import train_guide

__all__ = ["Conversion", "ConvertOptions", "inspect_guide", "run_conversion", "train_guide"]
