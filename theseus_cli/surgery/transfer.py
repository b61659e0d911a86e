"""Architecture transfer: rebuild a separate, different target network block by block (the paper's Appendix E.2).

Here the target's parts need not fit into the guide: a target built from its own
spec (``target.arch``) is aligned pair by pair, each target block's output to the
output of a group of guide blocks (CKA compares representations of different
widths, so no adapters are needed). The recipe gives the pairs explicitly
(``target.map``) or as two block lists (``target.blocks``) that are split
evenly: consecutive guide blocks are shared out over the target blocks in
execution order, the first groups taking one extra block when the division is
not exact (16 → 8 gives 2 each; 3 → 2 gives 2, 1). A target with more blocks than
its guide (a thin, deep edge network) is split the other way: consecutive target
blocks are grouped under one guide block (11 → 8: 2, 2, 2, 1, 1, 1, 1, 1), all of
a group trained in its stage and only its last block aligned; ``map`` entries may
list several target blocks (``target: [a, b]``) the same way. With a ``re:`` capture group
the split happens within each captured value, e.g. per ResNet stage, so no group
straddles a change of resolution.

The rest of the target is handled so: modules with weights that run before a
mapped block and are in no block (the stem, embeddings) are trained from that
block's stage on; modules after the last block (pooling, head, final norm) are
trained only in fine-tuning. With ``target.inherit`` (default) every guide weight
whose name and shape match a target weight outside the mapped blocks is copied
first (e.g. a shared stem, or GPT-2 embeddings of the same width). The report
lists all three.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.surgery.matching import pattern_matches
from theseus_cli.patterns import regex_fullmatch
from theseus_cli.surgery.plan import dry_trace
from theseus_cli.models.cost import count_flops
from theseus_cli.config.recipe import Recipe, TargetConfig
from theseus_cli.surgery.schedule import Stage


@dataclass
class TransferPair:
    target: str  # the target block aligned (the last of its group)
    guide: list[str]  # in execution order; the group's output is the last one's
    target_shape: tuple[int, ...]
    guide_shape: tuple[int, ...]
    trained_with: list[str] = field(default_factory=list)  # earlier target blocks of the group: trained, not aligned

    @property
    def guide_point(self) -> str:
        return self.guide[-1]

    @property
    def targets(self) -> list[str]:
        return [*self.trained_with, self.target]


@dataclass
class TransferPlan:
    input_shape: tuple[int, ...]
    pairs: list[TransferPair]
    stem: dict[str, list[str]]  # target block → modules outside blocks that feed it, trained from its stage on
    head: list[str]  # after the last block: trained in fine-tuning only
    inherited: list[str]  # target state-dict keys copied from the guide
    guide_params: int
    target_params: int
    guide_flops: int
    target_flops: int
    stages: list[Stage] = field(default_factory=list)
    entries: list = field(default_factory=list)  # nothing is replaced in place

    @property
    def align_points(self) -> list[str]:
        return [p.target for p in self.pairs]

    @property
    def blocks(self) -> list[str]:
        """Every mapped target block, aligned or trained with the one aligned after it."""
        return [b for p in self.pairs for b in p.targets]

    @property
    def guide_points(self) -> list[str]:
        return [p.guide_point for p in self.pairs]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _listed(model: nn.Module, pattern: str, info: dict, where: str) -> list[str]:
    """Paths matching ``pattern`` that run in the forward pass, in execution order; none nested in another."""
    hits = [p for p, m in model.named_modules() if p and pattern_matches(pattern, p, m)]
    if not hits:
        raise MatchError(f"{where}: {pattern!r} matched no module")
    silent = [p for p in hits if p not in info]
    if silent:
        raise MatchError(f"{where}: {', '.join(silent[:3])} never run in the forward pass")
    nested = [p for p in hits if any(p.startswith(q + ".") for q in hits)]
    if nested:
        raise MatchError(f"{where}: {pattern!r} matches modules inside each other ({nested[0]})")
    return sorted(hits, key=lambda p: info[p].order)


def split_sizes(n: int, parts: int) -> list[int]:
    """``n`` items in ``parts`` consecutive groups, sizes differing by at most one, larger first."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _key(pattern: str, path: str) -> str | None:
    if pattern.startswith("re:"):
        m = regex_fullmatch(pattern[3:], path)
        if m and m.groups():
            return m.group(1)
    return None


Pairs = list[tuple[list[str], list[str]]]  # (target group, guide group), each in execution order


def _even_split(ts: list[str], gs: list[str]) -> Pairs:
    """Share the longer list out over the shorter one in consecutive, near-equal groups (larger first)."""
    pairs, start = [], 0
    if len(gs) >= len(ts):
        for t, size in zip(ts, split_sizes(len(gs), len(ts))):
            pairs.append(([t], gs[start:start + size]))
            start += size
    else:  # a thin, deep target: several target blocks per guide block, the last of them aligned
        for g, size in zip(gs, split_sizes(len(ts), len(gs))):
            pairs.append((ts[start:start + size], [g]))
            start += size
    return pairs


def _grouped(pattern: str, blocks: list[str]) -> dict:
    keys = [_key(pattern, p) for p in blocks]
    return {k: [p for p, kk in zip(blocks, keys) if kk == k] for k in dict.fromkeys(keys)}


def resolve_pairs(cfg: TargetConfig, guide: nn.Module, target: nn.Module, g_info: dict, t_info: dict) -> Pairs:
    """(target group, guide group) pairs from ``target.map`` or ``target.blocks``, checked (see the module docstring)."""
    if cfg.blocks is not None:
        t_blocks = _listed(target, cfg.blocks.target, t_info, "target.blocks.target")
        g_blocks = _listed(guide, cfg.blocks.guide, g_info, "target.blocks.guide")
        t_groups, g_groups = _grouped(cfg.blocks.target, t_blocks), _grouped(cfg.blocks.guide, g_blocks)
        if (list(t_groups) != [None] or list(g_groups) != [None]) and list(t_groups) != list(g_groups):
            raise MatchError(f"target.blocks: captured groups differ: target {list(t_groups)}, guide {list(g_groups)}")
        return [pair for key, ts in t_groups.items() for pair in _even_split(ts, g_groups[key])]
    pairs = []
    for i, entry in enumerate(cfg.map):
        ts: list[str] = []
        for pattern in entry.target:
            hits = _listed(target, pattern, t_info, f"target.map[{i}].target")
            if len(hits) != 1:
                raise MatchError(f"target.map[{i}].target: {pattern!r} matches {len(hits)} modules ({', '.join(hits[:3])}); "
                                 "name exactly one per pattern (list several for a group of target blocks)")
            ts += [h for h in hits if h not in ts]
        gs: list[str] = []
        for pattern in entry.guide:
            gs += [p for p in _listed(guide, pattern, g_info, f"target.map[{i}].guide") if p not in gs]
        pairs.append((sorted(ts, key=lambda p: t_info[p].order), sorted(gs, key=lambda p: g_info[p].order)))
    return pairs


def check_pairs(pairs: Pairs, g_info: dict, t_info: dict) -> None:
    """Target groups disjoint and in execution order; guide groups disjoint and in order; every point a tensor."""
    problems = []
    for i, (ts, gs) in enumerate(pairs):
        for side, path, info in (("target", ts[-1], t_info), ("guide", gs[-1], g_info)):
            if info[path].output is None:
                problems.append(f"pair {i + 1}: {side} module '{path}' returns no tensor")
            elif info[path].calls > 1:
                problems.append(f"pair {i + 1}: {side} module '{path}' runs {info[path].calls} times per forward pass")
        problems += _order_problems(i, ts, gs, pairs[i - 1] if i else None, g_info, t_info)
    if problems:
        raise MatchError("; ".join(problems))


def _order_problems(i: int, ts: list[str], gs: list[str], previous, g_info: dict, t_info: dict) -> list[str]:
    nested = [(a, b) for a in ts for b in ts if a != b and b.startswith(a + ".")]
    out = [f"pair {i + 1}: target modules '{a}' and '{b}' overlap" for a, b in nested[:1]]
    if previous is None:
        return out
    pts, pgs = previous
    clash = [(a, b) for a in pts for b in ts if a == b or a.startswith(b + ".") or b.startswith(a + ".")]
    if clash:
        out.append(f"pairs {i} and {i + 1}: target modules '{clash[0][0]}' and '{clash[0][1]}' overlap")
    elif t_info[ts[0]].order < t_info[pts[-1]].order:
        out.append(f"pairs {i} and {i + 1}: target '{ts[0]}' runs before '{pts[-1]}'; give pairs in execution order")
    if set(gs) & set(pgs):
        out.append(f"pairs {i} and {i + 1}: guide module '{sorted(set(gs) & set(pgs))[0]}' is in both groups")
    elif g_info[gs[0]].order < g_info[pgs[-1]].order:
        out.append(f"pairs {i} and {i + 1}: guide group '{gs[0]}'… runs before the previous group ends")
    return out


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def stem_and_head(target: nn.Module, blocks: list[str], t_info: dict) -> tuple[dict[str, list[str]], list[str]]:
    """Modules with weights outside the blocks: those running before block k feed it; those after the last are the head."""
    inside = lambda p: any(p == b or p.startswith(b + ".") for b in blocks)  # noqa: E731
    stem: dict[str, list[str]] = {b: [] for b in blocks}
    head: list[str] = []
    for path, module in target.named_modules():
        if not path or inside(path) or not _own_params(module):
            continue
        if path not in t_info:
            head.append(path)  # never runs during the forward pass (e.g. a tied head): fine-tuning decides
            continue
        later = [b for b in blocks if t_info[b].order > t_info[path].order]
        (stem[later[0]] if later else head).append(path)
    return stem, head


def inherit_weights(guide: nn.Module, target: nn.Module, blocks: list[str]) -> list[str]:
    """Copy, outside ``blocks``, every target module whose tensors all have a same-named, same-shaped guide
    tensor (a module is copied whole or not at all: no head keeps a guide bias on a fresh weight).
    Returns the copied state-dict keys."""
    g_state = guide.state_dict()
    t_state = target.state_dict()
    by_module: dict[str, list[str]] = {}
    for key in t_state:
        if not any(key.startswith(b + ".") for b in blocks):
            by_module.setdefault(key.rpartition(".")[0], []).append(key)
    copied = [k for keys in by_module.values()
              if all(k in g_state and g_state[k].shape == t_state[k].shape for k in keys) for k in keys]
    with torch.no_grad():
        for k in copied:
            t_state[k].copy_(g_state[k])
    return copied


def transfer_stages(pairs: list[TransferPair], stem: dict[str, list[str]], kind: str) -> list[Stage]:
    """Progressive: stage t trains target groups 1..t (and what feeds them) against guide groups 1..t; a target
    group's blocks are all trained, its last block's output aligned."""
    feeds = lambda ps: [m for p in ps for b in p.targets for m in stem[b] + [b]]  # noqa: E731  (execution order)
    if kind == "joint":
        return [Stage([b for p in pairs for b in p.targets], feeds(pairs), [p.target for p in pairs],
                      guide_points=[p.guide_point for p in pairs])]
    stages = []
    for t, pair in enumerate(pairs):
        upto = pairs[: t + 1] if kind == "progressive" else [pair]
        stages.append(Stage(list(pair.targets), feeds(upto), [p.target for p in upto],
                            guide_points=[p.guide_point for p in upto]))
    return stages


def build_transfer_plan(guide: nn.Module, target: nn.Module, recipe: Recipe, sample) -> TransferPlan:
    """Trace both networks on ``sample``, resolve and check the pairs, inherit weights, count params and FLOPs."""
    g_info, t_info = dry_trace(guide, sample, "guide"), dry_trace(target, sample, "target")
    raw = resolve_pairs(recipe.target, guide, target, g_info, t_info)
    check_pairs(raw, g_info, t_info)
    pairs = [TransferPair(ts[-1], gs, t_info[ts[-1]].output, g_info[gs[-1]].output, ts[:-1]) for ts, gs in raw]
    blocks = [b for p in pairs for b in p.targets]
    stem, head = stem_and_head(target, blocks, t_info)
    inherited = inherit_weights(guide, target, blocks) if recipe.target.inherit else []
    one = sample[:1]
    plan = TransferPlan(tuple(sample.shape[1:]), pairs, stem, head, inherited,
                        sum(p.numel() for p in guide.parameters()), sum(p.numel() for p in target.parameters()),
                        count_flops(guide, one), count_flops(target, one))
    plan.stages = transfer_stages(pairs, stem, recipe.schedule.kind)
    return plan
