"""Files a conversion writes, written atomically, and reading them back.

``target.safetensors`` holds the converted weights plus, in its metadata, all
that is needed to rebuild the architecture: the guide spec (arch + kwargs) and
the plan entries (which module became what, with its params and shapes), the
resolved recipe and the input normalisation. :func:`load_target` rebuilds the
model from that file alone — no recipe, guide checkpoint or data needed — and
builds only architectures the installation vouches for unless trusted (README,
"Security"). Run directories (locks, overwrite, disk checks) are
:mod:`theseus_cli.rundir`'s.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from theseus_cli.models import MODEL_SOURCES, build_model
from theseus_cli.models.checkpoint_fit import rebuild_head
from theseus_cli.errors import ModelError, OutputError, TheseusError, disk_error
from theseus_cli.replacements import weights_follow
from theseus_cli.surgery.plan import PlanEntry, apply_entries
from theseus_cli.target_meta import META_VERSION, TargetMeta

FORMAT = "theseus-target/1"
TARGET_FILE = "target.safetensors"
REPORT_FILE = "report.json"
PLOT_FILE = "alignment.png"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temp file beside ``path``, then rename over it.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    The file gets ordinary permissions (0666 less the umask), not mkstemp's private 0600.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        err = disk_error(exc, path)
        if err is None:
            raise
        raise err from None
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        cause = None
        if isinstance(exc, Exception):  # measured before the partial file goes
            cause = errno.ENOSPC if disk_full(path.parent) else errno.EFBIG if at_file_size_limit(Path(tmp)) else None
        Path(tmp).unlink(missing_ok=True)
        err = write_error(exc, path, cause)
        if err is None:
            raise
        raise err from None


def disk_full(folder: Path, margin: int = 64 * 1024) -> bool:
    """Whether ``folder``'s file system has (nearly) no room left: libraries that write through their own I/O
    (torch's zip writer says "unexpected pos …") report a full disk in words of their own."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def at_file_size_limit(file: Path) -> bool:
    """Whether ``file`` reached the process's file-size limit (``ulimit -f``), which fails writes as ``EFBIG``."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        return soft != resource.RLIM_INFINITY and file.stat().st_size >= soft - 4096
    except OSError:
        return False


def write_error(exc: BaseException, path: Path, cause: int | None) -> OutputError | None:
    """An :class:`OutputError` naming ``path`` and the cause, if writing it failed because of the disk (``cause``: the
    errno the disk's state points to, for writers that do not say)."""
    import re

    err = disk_error(exc, path)
    if err is None:  # Rust and C++ writers quote the OS error in their message: "… (os error 28)"
        code = re.search(r"os error (\d+)", str(exc))
        if code is not None:
            err = disk_error(OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)))
    if err is None and cause is not None:
        err = disk_error(OSError(cause, os.strerror(cause), str(path)))
    return err


def versions() -> dict[str, str]:
    """The versions a report records (what produced it)."""
    import platform

    import torchvision

    from theseus_cli import __version__

    return {"theseus": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def save_target(path: Path, model: nn.Module, meta: TargetMeta | dict[str, Any]) -> None:
    """Write ``model``'s weights with ``meta`` (a plain dict is checked against :class:`TargetMeta` first)."""
    from safetensors.torch import save_model

    if not isinstance(meta, TargetMeta):
        meta = TargetMeta.checked(meta, path)
    meta = meta.model_copy(update={"meta_version": META_VERSION})
    metadata = {"format": FORMAT, "theseus": meta.to_json()}
    model = model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors (runtime.channels_last)
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=metadata))


def _target_path(path: str | Path) -> Path:
    path = Path(path)
    return path / TARGET_FILE if path.is_dir() else path


def read_target_metadata(path: str | Path) -> TargetMeta:
    """The typed metadata of a saved target (a run directory or the file), checked to have what
    :func:`load_target` needs: a file that is not JSON, lacks a field or has a newer version is a one-line
    :class:`ModelError`."""
    from safetensors import safe_open

    file = _target_path(path)
    if not file.is_file():
        raise ModelError(f"{file}: target file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ModelError(f"{file}: not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT or "theseus" not in metadata:
        raise ModelError(f"{file}: not a theseus target (metadata format {metadata.get('format')!r})")
    meta = TargetMeta.from_json(metadata["theseus"], file)
    if Path(path).is_dir() and not (Path(path) / REPORT_FILE).is_file():
        raise unfinished(path, f", or name {file} itself to use that file anyway")
    return meta


def unfinished(path: object, more: str = "") -> ModelError:
    return ModelError(f"{path}: an unfinished run (no {REPORT_FILE}: killed, failed or still running); finish it with "
                      f"convert --resume{more}")


# What a saved target may name without the user's say-so: architectures this installation itself provides.
VOUCHED_MODULES = ("theseus_cli.zoo", "theseus_cli.models.zoo")


def unvouched(spec: str) -> str | None:
    """Why building ``spec`` on a file's word needs the user's trust, or None when the installation vouches for it:
    ``torchvision:``/``timm:`` names, ``hf:`` config-built model types and installed packages' directories, and
    this project's zoo. A ``module:function`` imports and runs whatever the file chose; an ``hf:`` directory
    reads whatever folder on this machine the file chose."""
    prefix, _, name = spec.partition(":")
    if prefix == "hf":
        if name.startswith("pkg:"):
            return _outside_package(name[4:])
        return f"the model directory {name!r}" if name.startswith((".", "/")) else None
    source = MODEL_SOURCES.get(prefix)
    if (source is not None and source.vouched) or prefix in VOUCHED_MODULES:
        return None
    return f"code ({spec!r}: importing {prefix!r} and calling {name!r})"


def _outside_package(name: str) -> str | None:
    """Why an ``hf:pkg:<package>/<dir>`` name is not vouched for: its folder, resolved, leaves the package's."""
    from theseus_cli.packages import package_path

    package, _, inner = name.partition("/")
    try:
        package_path(package, inner)
    except ValueError:
        return f"the model directory {'hf:pkg:' + name!r}, which leads outside the package {package!r}"
    return None


def check_vouched(spec: str, trust_code: bool, source: object) -> None:
    """:class:`ModelError` (exit 4) if ``spec``, read from ``source``'s metadata, needs trust that was not given."""
    what = None if trust_code else unvouched(spec)
    if what is not None:
        raise ModelError(f"{source}: the target's metadata names {what}; a saved target may name only torchvision:, "
                         "timm:, hf: model types or installed packages, and theseus_cli.zoo architectures unless you pass "
                         "--trust-target (library: trust_code=True) for a file whose source you trust")


def load_target(path: str | Path, device: str = "cpu", trust_code: bool = False) -> nn.Module:
    """Rebuild a converted target from ``target.safetensors`` (or its finished run directory).

    Returns the model in eval mode; ``model.theseus_meta`` holds the :class:`TargetMeta` (input shape, normalisation,
    plan, recipe). A causal LM generates with its cache on (``generation_config.use_cache``): replaced sequence
    modules keep their recurrent state there, so each step feeds only the new token. The architecture the metadata names is built only if this installation vouches for it
    (see :func:`unvouched`), or with ``trust_code``: a downloaded target must not run code of its choosing.
    """
    from safetensors.torch import load_model

    file = _target_path(path)
    meta = read_target_metadata(path)
    spec = meta.architecture
    check_vouched(spec.arch, trust_code, file)
    try:
        model = rebuild_head(build_model(spec.arch, spec.kwargs, seed=0, task=meta.task), spec.head)
        with weights_follow():  # the file's weights replace any start computed from the random guide
            apply_entries(model, [PlanEntry.from_dict(e) for e in meta.entries])
    except TheseusError:
        raise
    except Exception as exc:
        raise ModelError(f"{file}: the target's metadata does not rebuild a model: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    try:
        load_model(model, str(file), strict=True, device=device)
    except Exception as exc:
        raise ModelError(f"{file}: weights do not fit the rebuilt target: {exc}") from None
    model.to(device).eval()
    model.theseus_meta = meta
    if meta.task == "causal-lm" and getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True  # generate streams: replaced modules keep their state in the cache
    return model
