"""Data in memory: image and text sources (a registry), transforms, tokenisers, batching."""

from theseus_cli.data.core import Dataset, batches_per_epoch, iterate_batches, sample_batches, subset
from theseus_cli.data.sources import DATA_SOURCES, DataSource, get_source, register_source, text_sources
from theseus_cli.data import images, text  # noqa: F401,E402  (register the built-in sources)

__all__ = ["DATA_SOURCES", "DataSource", "Dataset", "batches_per_epoch", "get_source", "iterate_batches",
           "register_source", "sample_batches", "subset", "text_sources"]
