"""``theseus search``: the most accurate target that meets the goals, found with Optuna.

:func:`run_search` runs a :class:`Search`, whose named phases are the pipeline:
open (guide, data, validation split, space) → screen (phase 1: every architecture exported and timed on ONNX
Runtime against the guide, before any training) → explore (phase 2: short conversions of the feasible
candidates ranked on the validation split, successive halving promoting the best to the full budget, in an Optuna
study) → finish (:mod:`theseus_cli.pipelines.search.finish`: the winner at full budget in ``DIR/best``, its test
metric computed once, its ONNX and int8 files measured again, ``search.json`` and ``pareto.png``).

The output directory is visibly unfinished until ``search.json`` is written (it is written last); ``--resume``
continues a killed search (finished trials and finished rungs are not run again), and ``--storage`` lets several
workers share one study (:mod:`theseus_cli.pipelines.search.study`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from theseus_cli.artifacts import write_json
from theseus_cli.config.recipe import Recipe, parse_recipe
from theseus_cli.config.search import SearchConfig, load_search
from theseus_cli.data.core import batches_per_epoch
from theseus_cli.errors import OutputError, TheseusWarning, UsageError
from theseus_cli.pipelines.search.cost import align_batches_per_epoch, planned_steps, spent_steps
from theseus_cli.pipelines.search.files import META_FILE, RESULT_FILE, TRIALS_DIR
from theseus_cli.pipelines.search.finish import finish
from theseus_cli.pipelines.search.incumbent import find_incumbent
from theseus_cli.pipelines.search.methods import METHODS, MethodContext, method_label
from theseus_cli.pipelines.search.screen import CACHE_FILE, Screen
from theseus_cli.pipelines.search.space import Architecture, SearchSpace, build_space
from theseus_cli.pipelines.search.trials import explore
from theseus_cli.pipelines.search.validation import carve_validation
from theseus_cli.progress import NullProgress, Progress, seconds
from theseus_cli.tasks import get_task
from theseus_cli.training.session import Session, attach_guide_embeddings, open_session



@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """How to run a search, besides the search file (the CLI's flags)."""

    checkpoint: Optional[str | Path] = None  # guide weights; default: the base recipe's
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    storage: Optional[str] = None  # an Optuna storage URL shared by several workers (None: DIR/study.journal)
    progress: Progress = field(default_factory=NullProgress)
    trial_progress: Optional[Progress] = None  # the trials' conversions (None: the same as progress)
    on_trial: Optional[Callable[[dict[str, Any]], None]] = None  # each finished trial's row (the CLI's live table)


@dataclass(frozen=True)
class Candidate:
    arch: Architecture
    method: str
    similarity: Optional[str]

    @property
    def label(self) -> str:
        return f"{self.arch.label} | {method_label(self.method, self.similarity)}"

    @property
    def key(self) -> str:
        return hashlib.sha256(self.label.encode()).hexdigest()[:12]


def check_runtime() -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise UsageError("goals.runtime: onnxruntime is not installed, and theseus search times every candidate on it "
                         "(phase 1): pip install 'theseus-cli[export]'")


def run_search(search_path: str | Path, out: str | Path, options: SearchOptions | None = None) -> dict[str, Any] | None:
    """Run (or continue, or join) the search in ``search_path``; write into ``out``; return ``search.json``'s data,
    or None when other workers of the study still run trials (the last one to finish writes the result)."""
    options = options or SearchOptions()
    search, base = load_search(search_path)
    check_runtime()
    out = Path(out)
    with _hold(out, options):
        return Search(search, base, Path(search_path), out, options).run()


@contextlib.contextmanager
def _hold(out: Path, options: SearchOptions):
    """The output directory: new (or emptied with ``--overwrite``), or resumed; locked for one process unless the
    study is shared (``--storage``), when every worker holds it at once."""
    from theseus_cli.rundir import locked

    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with (contextlib.nullcontext() if options.storage else locked(out)):
            yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


class Search:
    """One search, phase by phase: :meth:`open`, :meth:`screen`, :meth:`explore`, :meth:`finish`."""

    def __init__(self, search: SearchConfig, base: Recipe, path: Path, out: Path, options: SearchOptions):
        self.search, self.base, self.path, self.out, self.options = search, base, path, out, options
        self.progress = options.progress
        self.trial_progress = options.trial_progress if options.trial_progress is not None else options.progress
        self.started = time.perf_counter()
        self.fractions = search.budget.fractions()
        self.warnings: list[str] = []
        self.storage = self.study = None  # the study and its Optuna storage (phase 2)
        self.incumbent: Optional[Candidate] = None  # the base recipe's own candidate (phase 1 finds it)
        self._planned_cache: dict[tuple[str, float], int] = {}
        self.higher_is_better = get_task(base.task).higher_is_better

    def run(self) -> dict[str, Any] | None:
        self.open()
        if (self.out / RESULT_FILE).is_file():  # a finished search, resumed or joined: nothing is redone
            self.progress.log(f"search: {self.out / RESULT_FILE} is finished; nothing to run")
            return json.loads((self.out / RESULT_FILE).read_text())
        try:
            self.screen()
            self.explore()
            return finish(self)
        finally:
            if getattr(self, "screener", None) is not None:
                self.screener.close()

    # ------------------------------------------------------------------ phases

    def open(self) -> None:
        """Guide, data, the validation split and the space; the output directory claimed for this search."""
        self.session = open_session(self.base, self.options.checkpoint, self.options.device)
        sample = self.session.data.x_train[:2].to(self.session.device)
        # the space first: a search file whose space is empty or whose alternatives fit nothing leaves nothing behind
        self.space: SearchSpace = build_space(self.search, self.base, self.session.guide, sample, str(self.path))
        self.trial_session, self.validation = carve_validation(self.session, self.search.validation.size,
                                                               self.search.validation.rank_by, self.base.seed)
        if self.base.task == "sentence-embedding":  # once, not in every trial; minutes on a CPU: say so first
            self.progress.log(f"search: the guide's embeddings of {len(self.trial_session.data.x_train):,} "
                              "training sentences (once, for every trial)")
            attach_guide_embeddings(self.trial_session)
        self._check_methods()
        self.digest = self._digest()
        self._claim()
        self.progress.log(f"search: {len(self.space.groups)} groups, {len(self.space.architectures)} architectures × "
                          f"{len(self.methods())} methods; validation: {self.validation['size']} held-out "
                          f"{self.validation['from']}, ranked by {self.validation['rank_by']}")

    def _check_methods(self) -> None:
        """Each method on the first architecture, validated as a recipe: a method the base cannot take (progressive
        distillation of sentence embeddings) is an error naming it, before anything is written."""
        from theseus_cli.errors import RecipeError

        arch = self.space.architectures[0]
        for i, m in enumerate(self.search.space.methods):
            try:
                self.trial_recipe(Candidate(arch, m.method, (m.similarity or [None])[0]), 1.0, stages=1)
            except RecipeError as exc:
                reason = str(exc).split(": ", 2)[-1]
                raise RecipeError(f"{self.path}: space.methods[{i}]: {m.method} does not apply to the base recipe "
                                  f"{self.search.base}: {reason}") from None

    def _digest(self) -> str:
        # defaults left out: a later version's new field (at its default) does not orphan a study
        made_of = {"search": self.search.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                   "base": self.base.digest(),
                   "guide": self.session.guide_info.get("checkpoint_sha256")}
        return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()

    def _claim(self) -> None:
        """A new search writes its digest into ``DIR/.search.json``; ``--resume`` (and a worker joining with
        ``--storage``) must find the same digest there."""
        meta_path, o = self.out / META_FILE, self.options
        held = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        others = [p for p in self.out.iterdir() if p.name not in (META_FILE, ".theseus.lock")]
        if o.overwrite:
            for p in others + ([meta_path] if held else []):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            held = None
        elif held is not None and held.get("digest") != self.digest:
            raise OutputError(f"{self.out}: holds another search (made from another search file, base recipe or "
                              f"guide: study digest {held.get('digest', '?')[:12]}, this one {self.digest[:12]}); use "
                              "another --out, or --overwrite")
        elif held is not None and not (o.resume or o.storage):
            raise OutputError(f"{self.out}: holds a search; use --resume to continue it, or --overwrite")
        elif held is None and o.resume:
            raise OutputError(f"{self.out}: --resume, but the directory holds no search ({META_FILE}); use another "
                              "--out, or drop --resume")
        elif held is None and others:
            raise OutputError(f"{self.out}: directory exists and is not empty (use --overwrite to replace its files)")
        if held is None:
            write_json(meta_path, {"digest": self.digest, "search": str(self.path.resolve()),
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def screen(self) -> None:
        """Phase 1: every architecture built, exported and timed against the guide; the infeasible ones dropped."""
        started = time.perf_counter()
        self.screener = Screen(self.session, self.base, self.search.goals, self.out / CACHE_FILE)
        rt = self.search.goals.runtime
        self.progress.log(f"phase 1: timing the guide and {len(self.space.architectures)} architectures on ONNX Runtime "
                          f"({rt.precision}, batch {rt.batch}, {rt.threads} thread{'s' if rt.threads > 1 else ''}), "
                          "each alternating with the guide")
        self.guide_files = self.screener.guide()
        bar = self.progress.task("phase 1", len(self.space.architectures))
        self.phase1: dict[str, dict[str, Any]] = {}
        for arch in self.space.architectures:
            self.phase1[arch.digest] = self.screener.architecture(arch)
            bar.advance(1)
        bar.done(line=False)
        self.phase1_seconds = time.perf_counter() - started
        self.full_steps = self._base_steps()
        self.cap_steps = self.search.budget.max_cost * self.full_steps
        feasible = [a for a in self.space.architectures if self.phase1[a.digest]["feasible"]]
        self.candidates = [Candidate(a, m, s) for a in feasible for m, s in self.methods()]
        self.incumbent = find_incumbent(self)
        if self.incumbent is not None:
            self.progress.log(f"phase 2: the base recipe as written is candidate {self.incumbent.label}: never pruned")
        dropped = len(self.space.architectures) - len(feasible)
        self.progress.log(f"phase 1: {len(feasible)} of {len(self.space.architectures)} architectures meet the goals"
                          + (f"; {dropped} dropped ({self.drop_summary()})" if dropped else "")
                          + f"; guide {self.guide_files[rt.precision]['latency_ms']:.3g} ms; {seconds(self.phase1_seconds)}")

    def _base_steps(self) -> int:
        """One full conversion, the cost unit: the base recipe as written, on the search's training split."""
        from theseus_cli.surgery.plan import build_plan

        plan = build_plan(self.screener.guide_cpu, self.base, self.session.data.x_train[:2].to("cpu"))
        return max(1, self._planned(self.base, len(plan.stages)))

    def _planned(self, recipe: Recipe, stages: int) -> int:
        data = self.trial_session.data
        return planned_steps(recipe, stages, int(data.x_train.shape[0]), int(data.labelled.numel()), self.session.device)

    def planned(self, cand: Candidate, fraction: float) -> int:
        """The gradient steps a rung of ``cand`` at ``fraction`` of the budget runs at most (each pair planned once:
        the cap is checked before every rung)."""
        key = (cand.label, fraction)
        if key not in self._planned_cache:
            self._planned_cache[key] = self._planned(self.trial_recipe(cand, fraction),
                                                     self.phase1[cand.arch.digest]["stages"])
        return self._planned_cache[key]

    def spent_steps(self) -> int:
        """The steps every worker's rungs have run so far, each rung directory once."""
        if self.study is None:
            return 0
        return spent_steps(t.user_attrs.get("rungs", []) for t in self.study.get_trials(deepcopy=False))

    def drop_summary(self) -> str:
        counts: dict[str, int] = {}
        for record in self.phase1.values():
            for reason in record["dropped"]:
                kind = reason.split(" ")[0] if not reason.startswith("not exportable") else "not exportable"
                counts[kind] = counts.get(kind, 0) + 1
        return ", ".join(f"{n} over {k}" if k != "not exportable" else f"{n} not exportable" for k, n in counts.items())

    def explore(self) -> None:
        """Phase 2 (:mod:`theseus_cli.pipelines.search.trials`)."""
        explore(self)

    # ------------------------------------------------------------------ helpers

    def methods(self) -> list[tuple[str, Optional[str]]]:
        out = []
        for m in self.search.space.methods:
            out += [(m.method, s) for s in m.similarity] if m.similarity else [(m.method, None)]
        return out

    def trial_recipe(self, cand: Candidate, fraction: float, stages: int | None = None) -> Recipe:
        """The base recipe with the candidate's rules and method, at ``fraction`` of its alignment and fine-tuning."""
        data = self.base.resolved()
        data["replace"] = cand.arch.replace_rules()
        data["baseline"]["enabled"] = False
        per_epoch = self._align_per_epoch()
        align = data["align"]
        steps = min(align["max_steps_per_epoch"] or per_epoch, per_epoch)
        if fraction < 1:
            align["max_steps_per_epoch"] = steps = max(1, round(steps * fraction))
            ft = data["finetune"]
            if ft["epochs"] > 0:
                scaled = max(1, round(ft["epochs"] * fraction))
                ft["warmup_epochs"] = ft["warmup_epochs"] * scaled / ft["epochs"]
                ft["epochs"] = scaled
        epochs = align["auto"]["max_epochs"] if align["auto"]["enabled"] else align["epochs"]
        stages = stages if stages is not None else self.phase1[cand.arch.digest]["stages"]
        ctx = MethodContext(cand.similarity, stages * epochs * steps,
                            batches_per_epoch(int(self.trial_session.data.labelled.numel()), self.base.data.batch_size))
        METHODS.lookup(cand.method).rewrite(data, ctx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TheseusWarning)
            return parse_recipe(data, f"{self.path}: candidate {cand.label}")

    def _align_per_epoch(self) -> int:
        return align_batches_per_epoch(self.base, int(self.trial_session.data.x_train.shape[0]), self.session.device)

    def trial_dir(self, cand: Candidate, rung: int) -> Path:
        return self.out / TRIALS_DIR / cand.key / f"r{rung}"

    def trial_dir_of(self, entry: dict[str, Any]) -> Path:
        """The full-budget run directory of a conversion entry of the pool."""
        return self.out / TRIALS_DIR / entry["candidate_key"] / f"r{len(self.fractions) - 1}"

    def evaluate_guide(self) -> dict[str, float]:
        """The guide's validation metric in fp32 (PyTorch) and as its int8 file (ONNX Runtime)."""
        from theseus_cli.deploy.onnx_runtime import onnx_metric, open_onnx
        from theseus_cli.training import evaluate

        data, task, bs = self.trial_session.data, get_task(self.base.task), self.base.data.eval_batch_size
        fp32 = evaluate(self.session.guide, task, data.x_test, data.y_test, bs, self.session.device)
        int8 = onnx_metric(open_onnx(self.screener.guide_paths["int8"], 1), task, data.x_test.to("cpu"),
                           None if data.y_test is None else data.y_test.cpu(), bs)
        return {"fp32": fp32, "int8": int8}


def inspect_search(search_path: str | Path, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """``theseus inspect`` on a search file: the space's size, its groups and what each may become, and phase 1's
    feasibility (every architecture exported and timed against the guide, cached nowhere), with no training."""
    search, base = load_search(search_path)
    check_runtime()
    session = open_session(base, checkpoint, "cpu", probe=False)
    sample = session.data.x_train[:2]
    space = build_space(search, base, session.guide, sample, str(search_path))
    methods = sum(max(1, len(m.similarity)) for m in search.space.methods)
    screener = Screen(session, base, search.goals, None)
    try:
        guide = screener.guide()
        records = [screener.architecture(a) for a in space.architectures]
    finally:
        screener.close()
    feasible = sum(r["feasible"] for r in records)
    return {"kind": "search", "search": str(search_path), "base": search.base, "guide": session.guide_info,
            "space": space.summary(), "methods": methods, "candidates": feasible * methods,
            "goals": search.goals.model_dump(), "budget": {**search.budget.model_dump(), "fractions": search.budget.fractions()},
            "phase1": {"guide": guide, "architectures": records, "feasible": feasible}}
