"""What every recipe section shares: strict models (a typo is an error) and module-pattern checks."""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict

from theseus_cli.patterns import compile_regex


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def check_patterns(value: Union[str, list[str]], field: str) -> list[str]:
    """One pattern or a non-empty list of them, each checked (:func:`check_pattern`), as a list."""
    patterns = [value] if isinstance(value, str) else list(value)
    if not patterns:
        raise ValueError(f"{field} is empty")
    for p in patterns:
        check_pattern(p)
    return patterns


def check_pattern(pattern: str) -> str:
    if not pattern:
        raise ValueError("empty pattern")
    if pattern.startswith("re:"):
        try:
            compile_regex(pattern[3:])
        except ValueError as exc:
            raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from None
    elif pattern.startswith("exact:") and not pattern[len("exact:"):].isidentifier():
        raise ValueError(f"pattern {pattern!r}: 'exact:' takes a class name")
    return pattern


