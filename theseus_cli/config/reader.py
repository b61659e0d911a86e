"""Reading recipe files: YAML as data only, with the limits a hostile or careless file needs.

``yaml.safe_load`` constructs no Python objects; on top of it, a key given twice in one mapping is an
error (PyYAML silently keeps the last), and a document is refused when it is over
:data:`MAX_YAML_BYTES`, expands through aliases past :data:`MAX_YAML_VALUES` values (a "billion laughs"
document would otherwise blow up memory once validated and dumped) or nests deeper than
:data:`MAX_YAML_DEPTH` levels. Every problem is a :class:`RecipeError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from theseus_cli.errors import RecipeError

MAX_YAML_BYTES = 4 * 1024 * 1024  # a recipe is a page of settings; anything near this is not one
MAX_YAML_VALUES = 100_000  # values after expanding aliases: a billion-laughs document stops here, not in memory
MAX_YAML_DEPTH = 50  # nesting levels; a recipe needs about 5


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` (no Python objects), except that a key given twice in one mapping is an error: YAML
    leaves duplicates to the reader and PyYAML silently keeps the last, so a typo'd second ``epochs:`` would
    quietly win. Keys brought in by a merge (``<<: *base``) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {first[key].line + 1}); a key may "
                        "appear once in a mapping", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _check_size(data: Any, path: Path) -> None:
    """Refuse documents whose aliases expand past :data:`MAX_YAML_VALUES` values or that nest deeper than
    :data:`MAX_YAML_DEPTH` (walked without recursion, counting a shared value each time it is reached)."""
    stack, seen = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise RecipeError(f"{path}: the document expands to more than {MAX_YAML_VALUES:,} values "
                              "(aliases repeated inside aliases?); a recipe is far smaller")
        if depth > MAX_YAML_DEPTH:
            raise RecipeError(f"{path}: values nested more than {MAX_YAML_DEPTH} levels deep; a recipe needs a few")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def read_yaml(path: Path) -> Any:
    """A YAML file's data (no Python objects, no duplicate keys, bounded size and depth); :class:`RecipeError`
    naming the file otherwise."""
    try:
        if path.is_file() and path.stat().st_size > MAX_YAML_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size:,} bytes; a recipe is at most {MAX_YAML_BYTES:,}")
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: values nested too deeply to read (a recipe needs a few levels)") from None
    _check_size(data, path)
    return data
