"""Building architectures from specs and loading state dicts safely.

A spec is ``torchvision:<name>``, ``timm:<name>`` or ``package.module:function``
plus keyword arguments. Pretrained downloads are refused (this tool works
offline and from the user's own checkpoint). Checkpoints are state dicts:
``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with
``torch.load(weights_only=True)``, which never executes code from the file.
"""

from __future__ import annotations

import difflib
import importlib
import pickle
import re
import stat
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from theseus_cli.context import changed, run_state
from theseus_cli.errors import DeviceError, ModelError
from theseus_cli.packages import package_path
from theseus_cli.resources import available_bytes, gib, is_allocation_failure
from theseus_cli.models.checkpoint_fit import CheckpointFit, FitReport, fit_state, key_differences, reset_head
from theseus_cli.models.sources import MODEL_SOURCES, register_model_source

_FORBIDDEN_KWARGS = ("weights", "pretrained", "pretrained_cfg_overlay", "checkpoint_path")


def _close(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def build_model(spec: str, kwargs: dict[str, Any] | None = None, seed: int = 0, task: str = "classification") -> nn.Module:
    """Construct the architecture ``spec`` with seeded random weights (``task`` picks an ``hf:`` model's head)."""
    kwargs = dict(kwargs or {})
    for key in _FORBIDDEN_KWARGS:
        if kwargs.get(key):
            raise ModelError(f"{spec}: '{key}' would download weights; pass a local checkpoint instead")
        kwargs.pop(key, None)
    prefix, name = spec.split(":", 1)
    torch.manual_seed(seed)
    try:
        source = MODEL_SOURCES.get(prefix)
        model = source.build(name, kwargs, task) if source else _call_user_function(spec, prefix, name, kwargs)
    except ModelError:
        raise
    except TypeError as exc:
        raise ModelError(f"{spec}: bad kwargs {sorted(kwargs)}: {exc}{_fixed_kwarg_hint(prefix, name, str(exc))}") from None
    except Exception as exc:  # user code or library constructors: report, don't trace
        raise ModelError(f"{spec}: constructor failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


@register_model_source("torchvision", vouched=True, description="torchvision.models.get_model(<name>, weights=None)")
def _torchvision(name: str, kwargs: dict[str, Any], task: str) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelError(f"torchvision:{name}: unknown torchvision model{_close(name, torchvision.models.list_models())}")
    return torchvision.models.get_model(name, weights=None, **kwargs)


@register_model_source("timm", vouched=True, description="timm.create_model(<name>, pretrained=False)")
def _timm(name: str, kwargs: dict[str, Any], task: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"timm:{name}: unknown timm model{_close(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False, **kwargs)


def _fixed_kwarg_hint(prefix: str, name: str, message: str) -> str:
    """A torchvision builder that sets a keyword itself (``vit_b_16`` fixes ``num_layers``) refuses it from the
    recipe; name the constructors in the builder's module that take it, as ``module:Class`` specs."""
    import inspect as pyinspect

    hit = re.search(r"multiple values for keyword argument '(\w+)'", message)
    if prefix != "torchvision" or not hit:
        return ""
    import torchvision

    module = importlib.import_module(torchvision.models.get_model_builder(name).__module__)
    takers = []
    for attr, obj in vars(module).items():
        if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and attr != name:
            try:
                params = pyinspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if hit.group(1) in params and ("num_classes" in params or f"{attr}()" in message):  # a whole model
                takers.append(f"'{module.__name__}:{attr}'")
    return (f" (torchvision:{name} sets {hit.group(1)} itself; to choose it, build with "
            f"{' or '.join(takers[:3])} instead)") if takers else ""


def _call_user_function(spec: str, module_name: str, fn_name: str, kwargs: dict[str, Any]) -> Any:
    """The explicit ``module:function`` form: the one place a recipe names code to import."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        top = module_name.split(".")[0]
        here = Path.cwd() / f"{top}.py" if (Path.cwd() / f"{top}.py").is_file() else Path.cwd() / top
        hint = (f" ({here} exists, but the current directory is not on Python's module path: run with PYTHONPATH=. "
                "or install it as a package)" if here.exists() and isinstance(exc, ModuleNotFoundError) else "")
        raise ModelError(f"{spec}: cannot import module {module_name!r}: {exc}{hint}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise ModelError(f"{spec}: module {module_name!r} has no callable {fn_name!r}{_close(fn_name, public)}")
    return fn(**kwargs)


@contextmanager
def trusting_pickles(enabled: bool = True) -> Iterator[None]:
    """Within this block, ``.pt``/``.pth``/``.bin``/``.ckpt`` checkpoints are unpickled in full
    (``weights_only=False``), so a file holding a whole ``nn.Module`` (``torch.save(model)``) can be read.

    Unpickling runs whatever code the file names: only for files from a source you trust. This is the
    CLI's ``--trust-checkpoint``; without it every checkpoint is read with ``weights_only=True``.
    """
    with changed(trust_pickles=enabled):
        yield


def pickles_trusted() -> bool:
    return run_state().trust_pickles


def _not_a_file(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (never opened: a FIFO would block the read)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a checkpoint file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def sniff_format(path: Path) -> str:
    """``safetensors``, ``torch`` (a zip archive or a legacy pickle, read by ``torch.load``), ``empty`` or ``unknown``,
    from the file's first bytes: the suffix is only a name, and a mislabelled file should load, or fail saying what
    it really is."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive, or a legacy pickle
        return "torch"
    return "unknown"


def resolve_checkpoint(text: str | Path) -> Path:
    """A checkpoint path; ``pkg:<package>/<file>`` is a file inside an installed Python package (found without
    importing it), as offline weights often ship."""
    text = str(text)
    if not text.startswith("pkg:"):
        return Path(text)
    package, _, inner = text[4:].partition("/")
    try:
        path = package_path(package, inner)
    except ValueError as exc:
        raise ModelError(f"guide.checkpoint {text}: refused: {exc}") from None
    if path is None:
        raise ModelError(f"guide.checkpoint {text}: Python package {package!r} is not installed")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code from the file (unless inside :func:`trusting_pickles`).

    The format is sniffed from the content, not the suffix; a path that is a directory, a pipe or a device
    is named as such. Non-finite weights (NaN/Inf) are an error here, before any work uses them.
    """
    path = Path(path)
    problem = _not_a_file(path)
    if problem is not None:
        raise ModelError(f"{path}: checkpoint {problem}")
    kind = sniff_format(path)
    if kind in ("empty", "unknown"):
        raise ModelError(f"{path}: not a readable checkpoint: the file is empty" if kind == "empty" else
                         f"{path}: not a readable checkpoint: its content is neither safetensors nor a PyTorch file "
                         "(torch.save's zip archive or pickle), whatever its suffix says")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:  # from an open file: torch.load given a path picks its reader by the suffix, not the content
            check_inflated_size(path)
            with open(path, "rb") as fh, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols on the way to refusing a file
                state = torch.load(fh, map_location="cpu", weights_only=not pickles_trusted())
            if isinstance(state, nn.Module):  # trusted: a whole pickled model; its weights, for the recipe's architecture
                state = state.state_dict()
    except DeviceError:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            _unreadable(path, kind, exc)
        raise DeviceError(f"{path}: ran out of memory reading the checkpoint "
                          f"({available_text()} available)") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
            f"(weights_only=True never runs code from a checkpoint; save model.state_dict() instead, or pass "
            f"--trust-checkpoint if you trust the file's source). {first}"
        ) from None
    except (EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        _unreadable(path, kind, exc)
    except Exception as exc:  # safetensors raises its own error type
        raise ModelError(f"{path}: not a readable checkpoint ({kind} file): {type(exc).__name__}: {exc}") from None
    state = _unwrap_state_dict(path, state)
    check_finite(state, str(path))
    return state


def _unreadable(path: Path, kind: str, exc: BaseException) -> None:
    reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
    raise ModelError(f"{path}: not a readable checkpoint (truncated or corrupted {kind} file?): {reason}") from None


def inflated_size(path: Path) -> int | None:
    """The bytes a ``torch.save`` zip's entries take once read (its central directory's uncompressed sizes: the
    storages are read whole into memory), or None for a legacy pickle, whose size is not declared."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # not a zip: torch.load says what it is


def check_inflated_size(path: Path) -> None:
    """:class:`DeviceError` (exit 7) when the checkpoint's storages cannot fit in the memory available: a 2 MB zip
    can declare a 2 GiB storage, and reading it would end in the allocator's crash instead of one line."""
    size = inflated_size(path)
    have = available_bytes(torch.device("cpu"))
    if size is not None and have is not None and size > have:
        raise DeviceError(f"{path}: the checkpoint inflates to {gib(size)} in memory; {gib(have)} available")


def available_text() -> str:
    have = available_bytes(torch.device("cpu"))
    return "unknown memory" if have is None else gib(have)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """NaN/Inf in weights would surface 20 s later as a "diverged" alignment with the wrong advice; name them now."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad.append(f"{name} ({int((~finite).sum()):,} of {t.numel():,} values)")
    if bad:
        shown = ", ".join(bad[:5]) + (f", … ({len(bad)} tensors in all)" if len(bad) > 5 else "")
        raise ModelError(f"{source}: non-finite weights (NaN or Inf) in {shown}; the file is damaged or was saved "
                         "from a diverged run")


def _unwrap_state_dict(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict) and not isinstance(state.get(key), torch.Tensor):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``alias → first name`` for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for path, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{path}.{b}" if path else b)
    return names


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` and fail with the missing/unexpected/mismatched keys listed.

    Two differences from ``strict=True`` that are not mismatches: a tied weight saved once
    (safetensors stores shared tensors once) fills its aliases, and keys of buffers the model
    does not persist (e.g. BERT's ``position_ids`` in files written by older transformers) are dropped.
    """
    state = dict(state)
    for alias, name in tied_aliases(model).items():
        if alias not in state and name in state:
            state[alias] = state[name]
        elif name not in state and alias in state:
            state[name] = state[alias]
    for key in _non_persistent_buffers(model) & set(state):
        del state[key]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        hints = key_differences(missing, unexpected)
        hint = (f"; keys differ like {', '.join(hints)}: guide.key_map (--key-map) can rename them" if hints else "")
        raise ModelError(f"{source}: checkpoint does not fit the architecture: " + "; ".join(problems) + hint)
    model.load_state_dict(state, strict=True)


def load_guide(spec: str, kwargs: dict[str, Any], checkpoint: str | Path | None, seed: int,
               task: str = "classification", fit: CheckpointFit | None = None) -> nn.Module:
    """The guide: ``spec`` with weights from ``checkpoint``, or untrained (seeded) without one."""
    return load_guide_fitted(spec, kwargs, checkpoint, seed, task, fit)[0]


def load_guide_fitted(spec: str, kwargs: dict[str, Any], checkpoint: str | Path | None, seed: int,
                      task: str = "classification", fit: CheckpointFit | None = None) -> tuple[nn.Module, FitReport]:
    """:func:`load_guide`, with the checkpoint renamed, its head reset and keys ignored as ``fit`` says
    (:mod:`theseus_cli.models.checkpoint_fit`); and what that did."""
    model = build_model(spec, kwargs, seed, task)
    fit = fit or CheckpointFit()
    report = FitReport()
    if checkpoint is not None:
        state, report = fit_state(model, read_state_dict(checkpoint), fit, seed)
        load_state_dict_strict(model, state, str(checkpoint))
    elif fit.head == "reset":
        report.head = reset_head(model, fit, seed)
    return model, report
