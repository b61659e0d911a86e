"""The registry of data sources (``data.source`` in a recipe): adding one is one function and one decorator.

An ``images`` source's loader takes ``(path, size_hint)`` and returns numpy arrays ``(x_train, y_train,
x_test, y_test)`` or ``(x, y)`` (split here); a ``text`` source's loader takes ``(path)`` and returns the
corpus lines. This module depends on nothing else in the package, so the recipe schema can list the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from theseus_cli.errors import DataError
from theseus_cli.registry import Registry


@dataclass(frozen=True)
class DataSource:
    name: str
    kind: Literal["images", "text"]
    load: Callable
    needs_path: bool = False  # the recipe's data.path says where the files are
    description: str = ""


DATA_SOURCES: Registry[DataSource] = Registry("data source")


def register_source(name: str, *, kind: Literal["images", "text"], needs_path: bool = False,
                    description: str = "") -> Callable[[Callable], Callable]:
    def decorator(load: Callable) -> Callable:
        DATA_SOURCES.add(name, DataSource(name, kind, load, needs_path, description))
        return load

    return decorator


def get_source(name: str) -> DataSource:
    return DATA_SOURCES.lookup(name, DataError)


def text_sources() -> tuple[str, ...]:
    return tuple(n for n, s in DATA_SOURCES.items() if s.kind == "text")
