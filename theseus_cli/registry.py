"""``Registry``: the one shape every plug-in axis shares (replacements, similarities, model sources, data sources).

A registry is a mapping from name to entry that refuses a name registered twice and, on lookup of an unknown
name, raises one line listing the valid ones. Each axis keeps its own entry type and decorator."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, axis: str):
        super().__init__()
        self.axis = axis  # what an entry is, for messages: "similarity", "data source", …

    def add(self, name: str, entry: T) -> None:
        if name in self:
            raise ValueError(f"{self.axis} {name!r} registered twice")
        self[name] = entry

    def lookup(self, name: str, error: type[Exception] = ValueError, sort: bool = False) -> T:
        try:
            return self[name]
        except KeyError:
            valid = ", ".join(sorted(self) if sort else self)
            raise error(f"unknown {self.axis} {name!r} (valid: {valid})") from None
