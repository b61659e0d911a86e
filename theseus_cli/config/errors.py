"""Validation errors as one line a user can act on: every problem of a file at once, each with its location
(``replace[0].params.rank: ...``), and for an unknown key the keys that section accepts (closest first)."""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Optional[X]``, ``list[X]``, ``Union[...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_at(loc: tuple, root: type[BaseModel]) -> list[str]:
    """The keys the schema ``root`` allows in the mapping at ``loc`` (a pydantic error location)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = _model_in(field.annotation) if field is not None else None
    return [f.alias or n for n, f in model.model_fields.items()] if model is not None else []


def _unknown_key(loc: tuple, root: type[BaseModel]) -> str:
    key = loc[-1] if loc else ""
    valid = _keys_at(loc[:-1], root)
    near = difflib.get_close_matches(str(key), valid, n=1)
    if near:
        return f"unknown key (did you mean {near[0]!r}?)"
    return f"unknown key (valid: {', '.join(valid)})" if valid else "unknown key"


def problem(err: dict, root: type[BaseModel], prefix: tuple = ()) -> str:
    """One pydantic error as 'location: message'; an unknown key comes with the closest valid one."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    msg = _unknown_key(loc, root) if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        msg += _closest_choice(err)
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head and head in _keys_at(loc, root):  # "path: …" raised by a section's own check
        loc, msg = loc + (head,), rest  # belongs at data.path, not "data: path: …"
    return f"{_loc(prefix + loc)}: {msg}"


def _closest_choice(err: dict) -> str:
    """`` (did you mean 'fashion-mnist'?)`` for a value outside a ``Literal``'s choices, matched with ``_`` and
    ``-`` taken as the same."""
    import re

    choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
    given = str(err.get("input", ""))
    norm = {c.replace("_", "-").lower(): c for c in choices}
    near = difflib.get_close_matches(given.replace("_", "-").lower(), list(norm), n=1, cutoff=0.6)
    return f" (did you mean {norm[near[0]]!r}?)" if near else ""


MAX_PROBLEMS = 8  # listed in one message; the count says how many there are


def format_validation_error(source: str, exc: ValidationError, root: type[BaseModel],
                            extra: list[str] | None = None) -> str:
    """``source: N problems: loc: msg; …`` for a validation of the schema ``root`` (plus ``extra`` problems)."""
    problems = [problem(err, root) for err in exc.errors()] + list(extra or [])
    noun = "problem" if len(problems) == 1 else "problems"
    shown = "; ".join(problems[:MAX_PROBLEMS])
    more = f"; … and {len(problems) - MAX_PROBLEMS:,} more" if len(problems) > MAX_PROBLEMS else ""
    return f"{source}: {len(problems):,} {noun}: {shown}{more}"
