"""Module-path patterns (``re:<regex>``), matched in bounded time.

Patterns are compiled with the ``regex`` module (the same syntax as ``re``; already a dependency of
transformers) because it can stop a match after a time limit: a catastrophically backtracking pattern
such as ``re:(a|aa)+$`` against a long module path would otherwise hang ``inspect`` and ``convert``
with no output. A module path is at most a few hundred characters, so any sensible pattern matches in
microseconds; one that takes :data:`MATCH_SECONDS` is refused as a plan error.
"""

from __future__ import annotations

import functools

import regex

from theseus_cli.errors import MatchError

MATCH_SECONDS = 1.0


@functools.lru_cache(maxsize=4096)
def compile_regex(text: str) -> "regex.Pattern":
    """The compiled pattern; ``ValueError`` with the reason if it does not compile."""
    try:
        return regex.compile(text)
    except Exception as exc:  # regex.error, and whatever a pathological pattern makes the compiler raise
        raise ValueError(str(exc) or type(exc).__name__) from None


def regex_fullmatch(text: str, path: str) -> "regex.Match | None":
    """``text`` fullmatched against ``path``, or :class:`MatchError` if it takes more than :data:`MATCH_SECONDS`."""
    try:
        return compile_regex(text).fullmatch(path, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise MatchError(f"pattern 're:{text}' took over {MATCH_SECONDS:g} s to match the module path {path!r} "
                         "(catastrophic backtracking: avoid nested quantifiers such as (a+)+ or (a|aa)+)") from None
