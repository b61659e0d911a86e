"""``theseus export --format hf``: a transformers target as a ``save_pretrained`` directory, loaded back with
``from_pretrained`` and checked against PyTorch before it is put in place (``theseus_cli.deploy.export`` explains
the format and the check). A target with replaced modules also gets ``modeling_theseus.py``, a subclass of the
guide's class that re-applies the replacement plan, so loading it needs ``trust_remote_code=True`` and
``theseus_cli`` installed: a plain transformers target loads without either."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from theseus_cli.artifacts import current_umask
from theseus_cli.deploy.parity import Deployable, check_parity, quiet_exporters
from theseus_cli.errors import ExportError


def _modeling_file(base: str) -> str:
    return f'''"""Written by `theseus export --format hf`: a {base} some of whose modules theseus replaced.

The replacement plan is ``config.theseus_entries``; the new modules come from theseus_cli
(pip install theseus-cli), then transformers loads the saved weights into them.
"""

from transformers import {base} as _Base

from theseus_cli.surgery import PlanEntry, apply_entries


class Theseus{base}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_entries(self, [PlanEntry.from_dict(e) for e in config.theseus_entries])
'''


def export_hf(model: nn.Module, wrapper, cases, out: Path, meta, atol, rtol) -> dict[str, Any]:
    import transformers

    from theseus_cli.models.hf import HEADS

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ExportError(f"--format hf needs a transformers target; this one is a {type(model).__name__} "
                          "(export onnx or torchscript instead)")
    task = meta.task
    auto = HEADS[task]
    entries = meta.entries
    base = type(model).__name__
    config = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if entries:
            config.theseus_entries = entries
            config.auto_map = {auto: f"modeling_theseus.Theseus{base}"}
            (tmp / "modeling_theseus.py").write_text(_modeling_file(base))
        with quiet_exporters():
            model.save_pretrained(str(tmp))
        tokenizer = meta.tokenizer
        if tokenizer:
            from theseus_cli.data.text import load_tokenizer

            load_tokenizer(tokenizer, meta.guide.arch).save_pretrained(str(tmp))
        try:
            with quiet_exporters():
                loaded = getattr(transformers, auto).from_pretrained(str(tmp), trust_remote_code=bool(entries),
                                                                      local_files_only=True).eval()
        except Exception as exc:
            raise ExportError(f"the saved directory does not load with {auto}.from_pretrained: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        again = Deployable(loaded, task)
        parity = check_parity(lambda inputs: again(*inputs).detach(), wrapper, cases, atol, rtol, f"{auto}.from_pretrained")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for attr in ("theseus_entries", "auto_map"):
            if entries and hasattr(config, attr):
                delattr(config, attr)
    return {"parity": parity, "load_with": f"transformers.{auto}.from_pretrained(dir"
            + (", trust_remote_code=True)" if entries else ")"), "remote_code": bool(entries)}


def _replace_dir(new: Path, out: Path) -> None:
    """Put directory ``new`` at ``out``: an old export there is swapped out by renames, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    os.chmod(out, 0o777 & ~current_umask())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
