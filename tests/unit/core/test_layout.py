"""The package's shape: imports run one way (no cycle), no module reaches into another's private names, the CLI
and the pipelines sit on top, functions stay short, and names stored by older versions still import."""

from __future__ import annotations

from tests.conftest import REPO
import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PKG = REPO / "theseus_cli"
# Typer verbs declare one parameter per command-line option; they parse and call one library function each.
CLI_VERBS = PKG / "cli" / "app.py"
MAX_LINES, MAX_PARAMS = 60, 8


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """theseus_cli modules ``path`` imports, anywhere in the file except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                   for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("theseus_cli")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("theseus_cli"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path, name):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert len(graph) > 40
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _users_of(prefix: str) -> set[str]:
    return {m for m, deps in _graph().items() if any(d == prefix or d.startswith(prefix + ".") for d in deps)
            and not (m == prefix or m.startswith(prefix + "."))}


def test_the_library_never_imports_the_cli_and_deploy_never_imports_a_pipeline():
    assert _users_of("theseus_cli.cli") <= {"theseus_cli.__main__"}
    assert not {m for m in _users_of("theseus_cli.pipelines") if m.startswith("theseus_cli.deploy")}
    lower = ("theseus_cli.models", "theseus_cli.data", "theseus_cli.similarity", "theseus_cli.replacements",
             "theseus_cli.config", "theseus_cli.surgery")
    for upper in ("theseus_cli.training", "theseus_cli.pipelines", "theseus_cli.deploy", "theseus_cli.transport"):
        assert not {m for m in _users_of(upper) if m.startswith(lower)}, upper


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("theseus_cli"):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad


def test_functions_are_short_and_take_few_parameters():
    long, wide = [], []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                args = node.args
                params = [a for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
                if len(params) > MAX_PARAMS and path != CLI_VERBS:
                    wide.append(f"{name}.{node.name}: {len(params)} parameters")
    assert not long and not wide, long + wide


def test_names_stored_by_older_versions_still_import():
    """Saved targets and shipped recipes name theseus_cli.zoo; modeling_theseus.py files exported before the
    move import theseus_cli.plan and theseus_cli.hf_models."""
    from theseus_cli.zoo import cnn_small, resnet_small  # noqa: F401  (public, no warning)

    for old, names in (("theseus_cli.plan", ("PlanEntry", "apply_entries")), ("theseus_cli.hf_models", ("_HEADS",)),
                       ("theseus_cli.text_data", ("load_tokenizer",))):
        code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
                f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
                f"with warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n    import {old} as m\n"
                f"print(all(hasattr(m, n) for n in {names!r}))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert "warned" in res.stdout and res.stdout.strip().endswith("True"), res.stdout + res.stderr


def test_every_public_name_of_the_package_resolves():
    import theseus_cli

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(getattr(theseus_cli, name) is not None for name in theseus_cli.__all__)
    with pytest.raises(AttributeError):
        theseus_cli.no_such_name  # noqa: B018
