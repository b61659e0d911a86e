"""Which modules a recipe's rules claim.

Grammar: ``re:<regex>`` is a full match against the dotted module path (in bounded time, see
:mod:`theseus_cli.patterns`); ``exact:<Class>`` matches modules of exactly that class; a bare string
matches a module whose path equals it or which is an instance of a class of that name — subclasses
included, so ``Conv2d`` also claims timm's ``Conv2dSame`` (a subclass skipped without a word would leave
the conversion silently partial). ``ignore`` uses the same grammar. Unlike tools that only warn, a rule that
matches nothing, a module claimed by two rules, and a claimed module nested in
another claimed module are all errors: a silently partial conversion is worse
than a failed one.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.patterns import regex_fullmatch
from theseus_cli.config.recipe import RuleConfig


def class_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s class and of every module class it derives from (``nn.Module`` itself aside)."""
    return {k.__name__ for k in type(module).__mro__ if issubclass(k, nn.Module) and k is not nn.Module}


def pattern_matches(pattern: str, path: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return regex_fullmatch(pattern[3:], path) is not None
    if pattern.startswith("exact:"):
        return type(module).__name__ == pattern[len("exact:"):]
    return pattern == path or pattern in class_names(module)


def unclaimed_instances(model: nn.Module, rules: list[RuleConfig], claimed: list[str]) -> list[dict]:
    """Modules left unconverted although a rule names one of their classes (kept by ``ignore`` or an ``exact:``
    pattern): what ``inspect`` lists, so a partial conversion is a visible choice, never an accident."""
    named: dict[str, int] = {}
    for index, rule in enumerate(rules):
        for p in rule.match:
            if not p.startswith("re:"):
                named.setdefault(p[len("exact:"):] if p.startswith("exact:") else p, index)
    out = []
    for path, module in model.named_modules():
        if not path or path in claimed or any(path.startswith(c + ".") or c.startswith(path + ".") for c in claimed):
            continue
        hit = sorted(class_names(module) & set(named))
        if hit:
            out.append({"path": path, "type": type(module).__name__, "class": hit[0], "rule": named[hit[0]]})
    return out


@dataclass(frozen=True)
class Match:
    path: str
    rule: int


def rule_matches(rule: RuleConfig, path: str, module: nn.Module) -> bool:
    patterns = rule.match if isinstance(rule.match, list) else [rule.match]
    if not any(pattern_matches(p, path, module) for p in patterns):
        return False
    return not any(pattern_matches(p, path, module) for p in rule.ignore)


def resolve_matches(model: nn.Module, rules: list[RuleConfig]) -> list[Match]:
    """All (path, rule index) claims, in ``named_modules`` order; errors on any conflict."""
    modules = [(p, m) for p, m in model.named_modules() if p]
    claims: dict[str, int] = {}
    problems: list[str] = []
    for index, rule in enumerate(rules):
        hits = [p for p, m in modules if rule_matches(rule, p, m)]
        if not hits:
            problems.append(f"replace[{index}]: {_describe(rule)} matched no module{_suggest(rule, modules)}")
        for path in hits:
            if path in claims:
                problems.append(f"module '{path}' is claimed by replace[{claims[path]}] and replace[{index}]")
            else:
                claims[path] = index
    paths = sorted(claims)
    for outer in paths:
        for inner in paths:
            if inner != outer and inner.startswith(outer + "."):
                problems.append(f"module '{inner}' (replace[{claims[inner]}]) is inside '{outer}' (replace[{claims[outer]}]), which is replaced whole")
    if problems:
        raise MatchError("; ".join(problems))
    order = {p: i for i, (p, _) in enumerate(modules)}
    return [Match(p, claims[p]) for p in sorted(claims, key=order.__getitem__)]


def _describe(rule: RuleConfig) -> str:
    patterns = rule.match if isinstance(rule.match, list) else [rule.match]
    text = ", ".join(repr(p) for p in patterns)
    return f"match {text}" + (f" (ignore {', '.join(map(repr, rule.ignore))})" if rule.ignore else "")


def _suggest(rule: RuleConfig, modules: list[tuple[str, nn.Module]]) -> str:
    patterns = rule.match if isinstance(rule.match, list) else [rule.match]
    names = sorted({p for p, _ in modules} | {type(m).__name__ for _, m in modules})
    near: list[str] = []
    for pattern in patterns:
        if not pattern.startswith("re:"):
            near += difflib.get_close_matches(pattern, names, n=3)
    return f" (closest: {', '.join(dict.fromkeys(near))})" if near else ""
