"""Checkpoints, so a killed or stopped conversion resumes from its last finished stage or phase.

After every alignment stage, ``convert`` atomically replaces ``OUT/.resume/stages.pt``,
holding the hybrid target's state dict, the results of the finished stages, the alignment
batch generator's state and a fingerprint of what is being converted (resolved recipe hash
and guide checkpoint hash). After alignment + BatchNorm recalibration, and again after
fine-tuning, it replaces ``OUT/.resume/phase.pt`` (the target and the results so far).
``convert --resume`` continues from the latest of these: it rebuilds the hybrid, loads the
state and carries on; everything later (stage seeds, batch order, recalibration,
fine-tuning, baseline) is seeded, so the resumed run reaches the same target as an
uninterrupted one. The ``blockwise`` schedule checkpoints each stage alone (``OUT/.resume/blocks/``: its trained
modules' state and its result), and a sharded run (``runtime.fsdp``) writes the target's shards with
``torch.distributed.checkpoint`` beside the figures (:mod:`theseus_cli.pipelines.sharded`). Each baseline run (``baseline.runs``) that finishes adds its result to
``OUT/.resume/baselines.pt`` (figures only: a baseline's weights are never kept), and a
resumed run skips it: each run starts from its own seeds, so the others come out the same.
The work of a stage, phase or baseline run that was cut short is redone. Files are read
with ``weights_only=True`` and removed when the run finishes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.artifacts import atomic_write
from theseus_cli.errors import OutputError

RESUME_DIR = ".resume"
RESUME_FILE = "stages.pt"


def _file(out: Path) -> Path:
    return out / RESUME_DIR / RESUME_FILE


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict on the CPU. Tensors already there are saved as they are, not cloned: ``torch.save``
    writes them before anything changes them, and a clone would double the memory of a large model at every
    checkpoint."""
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def save_stages(out: Path, target: nn.Module | None, stages: list[dict[str, Any]], generator: torch.Generator,
                fingerprint: dict[str, Any]) -> None:
    """The finished stages' figures, the batch generator and the target's state (None: a sharded run, whose state
    :mod:`theseus_cli.pipelines.sharded` writes beside it)."""
    payload = {
        "fingerprint": fingerprint,
        "stages": stages,
        "generator": generator.get_state(),
        "state": cpu_state(target) if target is not None else {},
    }
    atomic_write(_file(out), lambda tmp: torch.save(payload, tmp))


def _load_checked(file: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's payload (tensors and plain data only), or None without one; refuses one of another run."""
    if not file.is_file():
        return None
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise OutputError(f"{file}: unreadable checkpoint ({type(exc).__name__}); delete it or drop --resume") from None
    difference = fingerprint_difference(payload.get("fingerprint") or {}, fingerprint)
    if difference:
        raise OutputError(f"{file}: {difference}; give the same recipe and guide to resume, or use another --out or "
                          "--overwrite")
    return payload


MATCHED = ("recipe_hash", "guide")  # what a resumed run must share with the killed one; "checkpoint" (the path) only names it


def fingerprint_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Which of the recipe and the guide checkpoint differ between the run that wrote ``stored`` and this one, and
    what each was made from (a forgotten GUIDE argument reads "this command gives none: an untrained guide")."""
    parts = []
    if stored.get("recipe_hash") != current.get("recipe_hash"):
        parts.append(f"made for a different recipe (its resolved recipe hash {str(stored.get('recipe_hash'))[:12]}, "
                     f"this command's {str(current.get('recipe_hash'))[:12]})")
    if stored.get("guide") != current.get("guide"):
        parts.append(f"made from {_guide_text(stored)}, and this command gives {_guide_text(current)}")
    return "; ".join(parts) or None


def _guide_text(fingerprint: dict[str, Any]) -> str:
    if fingerprint.get("guide") is None:
        return "no guide checkpoint (an untrained guide)"
    where = fingerprint.get("checkpoint")
    return f"the guide checkpoint {where + ' ' if where else ''}(sha256 {fingerprint['guide'][:12]}…)"


def load_stages(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The last stage checkpoint in ``out``, or None; refuses one made for another recipe or guide."""
    return _load_checked(_file(out), fingerprint)


BLOCKS_SUBDIR = "blocks"


def save_block_stage(out: Path, index: int, modules: dict[str, nn.Module], result: dict[str, Any],
                     fingerprint: dict[str, Any]) -> None:
    """A finished ``blockwise`` stage: its trained modules' state and its result, one file per stage (stages are
    independent, so a resumed run restores each finished one whatever the order they ran in)."""
    state = {f"{path}.{k}": v for path, module in modules.items() for k, v in cpu_state(module).items()}
    payload = {"fingerprint": fingerprint, "index": index, "result": result, "state": state}
    atomic_write(out / RESUME_DIR / BLOCKS_SUBDIR / f"{index:05d}.pt", lambda tmp: torch.save(payload, tmp))


def load_block_stage(out: Path, index: int, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished ``blockwise`` stage's checkpoint, or None; refuses one of another recipe or guide."""
    return _load_checked(out / RESUME_DIR / BLOCKS_SUBDIR / f"{index:05d}.pt", fingerprint)


def clear(out: Path) -> None:
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)


PHASE_FILE = "phase.pt"


def save_phase(out: Path, phase: str, target: nn.Module | None, results: dict[str, Any],
               fingerprint: dict[str, Any]) -> None:
    """After alignment (``aligned``: aligned and recalibrated) and after fine-tuning (``finetuned``): the target's
    state and everything the report needs from the phases done, so a resumed run skips them."""
    payload = {"fingerprint": fingerprint, "phase": phase, "results": results,
               "state": cpu_state(target) if target is not None else {}}
    atomic_write(out / RESUME_DIR / PHASE_FILE, lambda tmp: torch.save(payload, tmp))


def load_phase(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The last phase checkpoint in ``out``, or None; refuses one made for another recipe or guide."""
    return _load_checked(out / RESUME_DIR / PHASE_FILE, fingerprint)


BASELINES_FILE = "baselines.pt"


def save_baselines(out: Path, finished: dict[str, dict[str, Any]], fingerprint: dict[str, Any]) -> None:
    """The results of the baseline runs finished so far (plain figures), so a resumed run skips them."""
    payload = {"fingerprint": fingerprint, "finished": finished}
    atomic_write(out / RESUME_DIR / BASELINES_FILE, lambda tmp: torch.save(payload, tmp))


def load_baselines(out: Path, fingerprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The finished baseline runs' results in ``out`` (none: empty); refuses those of another recipe or guide."""
    payload = _load_checked(out / RESUME_DIR / BASELINES_FILE, fingerprint)
    return {} if payload is None else payload["finished"]


def describe_phase(phase: str) -> str:
    return ("after fine-tuning (baseline runs not yet finished are redone)" if phase == "finetuned"
            else "from the aligned target")


def describe(out: Path) -> str:
    """Where ``convert --resume`` on ``out`` would continue from, in words."""
    phase, stages = out / RESUME_DIR / PHASE_FILE, _file(out)
    try:
        if phase.is_file():
            return describe_phase(torch.load(phase, map_location="cpu", weights_only=True)["phase"])
        if stages.is_file():
            n = len(torch.load(stages, map_location="cpu", weights_only=True)["stages"])
            return f"after alignment stage {n}"
        blocks = sorted((out / RESUME_DIR / BLOCKS_SUBDIR).glob("*.pt"))
        if blocks:
            return f"with the {len(blocks)} block-wise stage{'s' if len(blocks) > 1 else ''} that had finished"
    except Exception:  # an unreadable checkpoint: resume will say so
        pass
    return "from the start (no stage had finished)"


LEGS_FILE = "legs.json"


def save_legs(out: Path, legs: list[float], align_seconds: float) -> None:
    """The wall seconds of each leg of the run so far (the killed ones up to their last checkpoint, the current one
    up to now) and the alignment's seconds over all legs: a resumed run's report adds them up instead of reporting
    its last leg alone. Written with every checkpoint."""
    import json

    text = json.dumps({"legs": legs, "align_seconds": align_seconds})
    atomic_write(out / RESUME_DIR / LEGS_FILE, lambda tmp: Path(tmp).write_text(text))


def load_legs(out: Path) -> tuple[list[float], float]:
    """(earlier legs' seconds, their alignment seconds); ([], 0.0) without a record or with an unreadable one (the
    times are a report's figures, not state a resumed run needs)."""
    import json

    try:
        data = json.loads((out / RESUME_DIR / LEGS_FILE).read_text())
        legs = [float(v) for v in data["legs"]]
        return legs, float(data["align_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return [], 0.0
