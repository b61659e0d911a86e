"""``inspect``'s tables and notes: the replacement plan or the transfer map, the alignment's cost, what fitting
the guide's checkpoint did. Every user-derived text is escaped (module paths and patterns hold '[…]')."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _e(value) -> str:
    """User-derived text (paths, module names, specs) for rich: escaped, so '[…]' in it is printed, not parsed."""
    return escape(str(value))


def _count(paths: list[str]) -> str:
    return _e(paths[0]) if len(paths) == 1 else f"{len(paths)} modules ({_e(paths[0])} … {_e(paths[-1])})"


def _shape(shape) -> str:
    return "×".join(map(str, shape)) if shape else "-"


# the plan table's columns, widest set first; the first set that fits the console's width is printed, and a console
# too narrow for the last gets one line per module: a number, a path or a rule is never split across lines
PLAN_COLUMNS = (("path", "type", "output", "params", "FLOPs", "rule", "becomes", "target params", "target FLOPs"),
                ("path", "type", "params", "rule", "becomes", "target params"),
                ("path", "params", "becomes", "target params"))


def _becomes(row: dict) -> str | None:
    """``lowrank_linear(rank=16)``: the replacement with the params that differ from its defaults."""
    if not row["becomes"]:
        return None
    from theseus_cli.replacements.registry import get_replacement

    fields = get_replacement(row["becomes"]).params_model.model_fields
    args = ", ".join(f"{k}={v}" for k, v in row["becomes_params"].items()
                     if v is not None and (k not in fields or fields[k].default != v))
    return f"[green]{_e(row['becomes'])}[/]({_e(args)})"


def _plan_cells(row: dict) -> dict[str, str]:
    replaced = row["becomes"] is not None
    return {"path": _e(row["path"]), "type": _e(row["module_type"]), "output": _shape(row["output_shape"]),
            "params": f"{row['params']:,}", "FLOPs": _flops(row["flops"]),
            "rule": f"replace[{row['rule']}]" if row["rule"] is not None else "",
            "becomes": _becomes(row) or "[dim]kept[/]",
            "target params": f"{row['target_params']:,}" if replaced else f"{row['params']:,}",
            "target FLOPs": _flops(row["target_flops"] if replaced else row["flops"])}


def _plan_table(plan: dict, columns: tuple[str, ...]) -> Table:
    table = Table(title=f"{_e(plan['guide']['arch'])} on input {_shape(plan['input_shape'])}", show_lines=False)
    for col in columns:  # only "becomes" wraps, and only between its arguments
        table.add_column(col, justify="right" if "params" in col or "FLOPs" in col else "left",
                         no_wrap=col != "becomes", overflow="fold")
    for row in plan["rows"]:
        cells = _plan_cells(row)
        table.add_row(*(cells[c] for c in columns))
    return table


def fits(table: Table, console: Console) -> bool:
    """Whether ``table`` renders within the console's width with no cell broken inside a word: each no-wrap column
    as wide as its widest cell (header included), each other column as its longest word, plus padding and rules."""
    from rich.cells import cell_len
    from rich.text import Text

    def plain(cell) -> str:
        return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain

    need = len(table.columns) + 1  # vertical rules
    for column in table.columns:
        cells = [plain(column.header), *(plain(c) for c in column.cells)]
        pieces = cells if column.no_wrap else [w for c in cells for w in c.split()]
        need += max((cell_len(p) for p in pieces), default=0) + 2  # one space of padding each side
    return need <= console.width


def _print_plan_rows(plan: dict, out_console: Console) -> None:
    table = next((t for t in (_plan_table(plan, cols) for cols in PLAN_COLUMNS) if fits(t, out_console)), None)
    if table is not None:
        out_console.print(table)
        return
    out_console.print(f"{_e(plan['guide']['arch'])} on input {_shape(plan['input_shape'])}:")
    for row in plan["rows"]:  # too narrow for any table: one line per module, wrapped between words
        c = _plan_cells(row)
        out_console.print(f"{c['path']} ({c['type']}, {c['params']} params) → {c['becomes']}, {c['target params']} params")


def print_plan(plan: dict, out_console: Console) -> None:
    """The plan as ``inspect`` prints it (``inspect --json`` prints the same data)."""
    if plan["kind"] == "transfer":
        _print_transfer(plan, out_console)
        return
    _print_plan_rows(plan, out_console)
    for u in plan.get("unclaimed", []):
        out_console.print(f"[yellow]not converted:[/] {_e(u['path'])} ({_e(u['type'])}) is a {_e(u['class'])}, the class "
                          f"replace[{u['rule']}] names, but that rule does not claim it (ignore / exact:)")
    stages = Table(title=f"stages: {plan['schedule']['kind']}, {plan['schedule']['order']}"
                   + (f", grouped by the first {plan['schedule']['group_depth']} path components" if plan["schedule"]["group_depth"] else ""))
    for col in ("stage", "introduces", "trains", "aligns", "fed by"):
        stages.add_column(col, overflow="fold", no_wrap=col in ("stage", "fed by"))
    for i, st in enumerate(plan["stages"]):
        stages.add_row(str(i + 1), _e(", ".join(st["introduced"])), _count(st["trained"]), _count(st["aligned"]), st["feed"])
    if fits(stages, out_console):
        out_console.print(stages)
    else:  # lists of paths wrap between paths, never inside one
        for i, st in enumerate(plan["stages"]):
            out_console.print(f"stage {i + 1}: introduces {_e(', '.join(st['introduced']))}; trains {_count(st['trained'])}; "
                              f"aligns {_count(st['aligned'])}; fed by {st['feed']}")
    g = plan["guide"]
    out_console.print(f"guide: {_e(g['arch'])} ({'checkpoint ' + _e(g['checkpoint']) if g['trained'] else 'untrained, seeded'})")
    _print_checkpoint_fit(g.get("checkpoint_fit"), out_console)
    out_console.print(f"replaced: {len(plan['entries'])} modules in {len(plan['stages'])} stages "
                      f"({plan['schedule']['kind']}, {plan['schedule']['order']}, similarity {plan['similarity']})")
    _print_cost(plan["cost"], out_console)
    out_console.print(f"params: guide {plan['guide_params']:,} → target {plan['target_params']:,} "
                      f"(×{plan['param_ratio']:.2f})")
    if plan.get("flop_ratio") is not None:
        out_console.print(f"FLOPs per example: guide {plan['guide_flops']:,} → target {plan['target_flops']:,} "
                          f"(×{plan['flop_ratio']:.2f})")


def _print_cost(cost: dict, out_console: Console) -> None:
    """The alignment's size (stages × steps), and grouping's stage counts when there are many stages."""
    cap = " at most" if cost["epochs_are_a_cap"] else ""
    each = ("each through one stored block, after one pass of the guide storing the blocks' inputs on disk"
            if cost.get("blockwise") else "each through the guide and the hybrid")
    out_console.print(f"alignment:{cap} {cost['align_steps']:,} steps ({cost['stages']} stages × {cost['steps_per_stage']:,} "
                      f"steps, {each})")
    if cost.get("grouped"):
        options = ", ".join(f"group_depth: {d} → {n} stage{'' if n == 1 else 's'}" for d, n in cost["grouped"].items())
        out_console.print(f"[yellow]{cost['stages']} stages, one per replaced module:[/] grouping modules by their "
                          f"first path components makes fewer, longer stages ({options}); set schedule.group_depth")


def _print_checkpoint_fit(fit: dict | None, out_console: Console) -> None:
    """What guide.key_map, guide.head and guide.ignore_keys did to the checkpoint."""
    if not fit:
        return
    for rule in fit["renamed"]:
        out_console.print(f"key_map: {_e(rule['rule'])} renamed {rule['keys']} keys"
                          + (" [yellow](renamed nothing)[/]" if not rule["keys"] else ""))
    head = fit.get("head")
    if head:
        out_console.print(f"head reset: {_e(head['path'])} ({head['classes_before']} → {head['classes']} classes; "
                          f"{len(head.get('dropped_keys', []))} checkpoint tensors dropped; fitted as a linear probe "
                          "before conversion, trained again in fine-tuning)")
    for kind, keys in fit["ignored"].items():
        out_console.print(f"ignored {kind} keys: {len(keys)} ({_e(', '.join(keys[:4]))}{' …' if len(keys) > 4 else ''})")


def _flops(n: int | None) -> str:
    """FLOPs per example, short (12.3M); "?" where a replacement's cost could not be counted before building it."""
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _print_transfer(plan: dict, out_console: Console) -> None:
    """``inspect`` for architecture transfer: the map with shapes on both sides, what else is trained, the ratios."""
    t = plan["target"]
    table = Table(title=f"{_e(plan['guide']['arch'])} → {_e(t['arch'])} on input {_shape(plan['input_shape'])}")
    for col in ("stage", "target block", "target output", "guide group", "guide output", "also trained from here"):
        table.add_column(col, overflow="fold")
    for i, pair in enumerate(plan["pairs"]):
        group = pair["guide"][0] if len(pair["guide"]) == 1 else f"{pair['guide'][0]} … {pair['guide'][-1]} ({len(pair['guide'])})"
        targets = [*pair.get("trained_with", []), pair["target"]]
        block = targets[0] if len(targets) == 1 else f"{targets[0]} … {targets[-1]} ({len(targets)}, the last aligned)"
        table.add_row(str(i + 1), _e(block), _shape(pair["target_shape"]), _e(group), _shape(pair["guide_shape"]),
                      _e(", ".join(m for t in targets for m in plan["stem"].get(t, []))))
    out_console.print(table)
    g = plan["guide"]
    out_console.print(f"guide: {_e(g['arch'])} ({'checkpoint ' + _e(g['checkpoint']) if g['trained'] else 'untrained, seeded'})")
    _print_checkpoint_fit(g.get("checkpoint_fit"), out_console)
    out_console.print(f"schedule: {plan['schedule']['kind']}, similarity {plan['similarity']}; head (fine-tuning only): "
                      f"{_e(', '.join(plan['head'])) or '-'}; inherited from the guide: {len(plan['inherited'])} tensors"
                      + (f" ({_e(', '.join(sorted({k.rpartition('.')[0] or k for k in plan['inherited']})))})" if plan["inherited"] else ""))
    out_console.print(f"params: guide {plan['guide_params']:,} → target {plan['target_params']:,} (×{plan['param_ratio']:.2f}); "
                      f"FLOPs per example: {plan['guide_flops']:,} → {plan['target_flops']:,} (×{plan['flop_ratio']:.2f})")
