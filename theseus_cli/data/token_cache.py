"""An on-disk cache of tokenised corpora, so that a command on a text recipe does not tokenise its corpus again.

Tokenising the King James Bible with the GPT-2 BPE takes about 4 s on one CPU core, and every ``convert``,
``eval``, ``train-guide`` or ``export --quantize`` of a text recipe needs the whole corpus tokenised (the
sequences are cut from one stream, so a ``train_limit`` does not shorten it). Within one process
:func:`theseus_cli.data.text.corpus_stream` already keeps the result; this keeps it between processes.

**Where.** ``$THESEUS_CACHE_DIR/tokens/``; without that variable ``$XDG_CACHE_HOME/theseus/tokens/``, else
``~/.cache/theseus/tokens/``. ``THESEUS_CACHE_DIR=off`` turns the cache off. A folder that cannot be created or
written is no error: the tokens are computed as if there were no cache.

**What decides a hit.** The file name is a SHA-256 over everything the tokens depend on: the corpus text itself
(not its path), the tokenizer's complete serialised form (vocabulary, merges, normaliser, pre-tokeniser, special
tokens; ``backend_tokenizer.to_str()``), the ``tokenizers`` library's version, the call (one stream, or padded
sentences at a ``max_length``, with the padding side and pad id) and this format's version. So an edited corpus or
another tokenizer never reads stale tokens, and nothing needs invalidating by hand. A tokenizer without a
serialised form (a slow, Python-only one) is not cached.

**Safety.** The files are safetensors (tensors only: reading one runs no code). A file that does not load, or
whose tensors are not what the call returns (dtype, shape, ids outside the vocabulary, a mask not of 0/1), is
ignored and replaced. Writes go through a renamed temporary file, so two processes filling
the same entry at once leave one whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

FORMAT_VERSION = 1
CACHE_ENV = "THESEUS_CACHE_DIR"
OFF = "off"


def cache_folder() -> Path | None:
    """The token cache folder (not created here), or None when ``THESEUS_CACHE_DIR=off`` or there is no home folder
    to put it in (a container user without one)."""
    chosen = os.environ.get(CACHE_ENV)
    try:
        if chosen is not None:
            return None if chosen.strip().lower() == OFF else Path(chosen).expanduser() / "tokens"
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except RuntimeError:  # Path.home(): no $HOME and no password entry
        return None
    return Path(base) / "theseus" / "tokens"


def tokenizer_fingerprint(tok) -> str | None:
    """A digest of everything the tokenizer's output depends on, or None when it has no serialised form."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        import tokenizers

        described = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 — a tokenizer we cannot describe is simply not cached
        return None
    for per_call in ("truncation", "padding"):  # set by the last call's arguments (which the key holds), not fixed
        described.pop(per_call, None)
    serialised = json.dumps(described, sort_keys=True)
    extra = {"tokenizers": tokenizers.__version__, "padding_side": getattr(tok, "padding_side", None),
             "truncation_side": getattr(tok, "truncation_side", None), "pad_token_id": getattr(tok, "pad_token_id", None)}
    return hashlib.sha256((serialised + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


def entry_key(lines: tuple[str, ...], fingerprint: str, call: dict) -> str:
    """The cache file's name: a digest of the corpus text, the tokenizer's fingerprint and the call."""
    text = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    head = json.dumps({"format": FORMAT_VERSION, "tokenizer": fingerprint, "call": call, "lines": len(lines),
                       "text": text}, sort_keys=True)
    return hashlib.sha256(head.encode()).hexdigest()


def _valid(tensors: dict[str, torch.Tensor], names: tuple[str, ...], vocab: int, rows: int | None) -> bool:
    """Whether loaded tensors are what the tokenising call would return (else the file is recomputed)."""
    if set(tensors) != set(names) or any(t.dtype != torch.int64 for t in tensors.values()):
        return False
    ids = tensors[names[0]]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        return False
    if rows is None:
        return ids.dim() == 1
    mask = tensors.get("attention_mask")
    return (ids.dim() == 2 and ids.shape[0] == rows and mask is not None and mask.shape == ids.shape
            and bool(((mask == 0) | (mask == 1)).all()))


def cached_tokens(lines: tuple[str, ...], tok, call: dict, names: tuple[str, ...],
                  compute: Callable[[], dict[str, torch.Tensor]], rows: int | None = None) -> dict[str, torch.Tensor]:
    """``compute()``'s tensors (named ``names``, int64), read from the cache when an entry for exactly this corpus,
    tokenizer and call exists, else computed and stored. ``rows``: the first tensor's row count for padded
    sentences (None: one 1-D stream)."""
    folder = cache_folder()
    fingerprint = None if folder is None else tokenizer_fingerprint(tok)  # serialising the tokenizer takes ~0.3 s
    if fingerprint is None:
        return compute()
    path = folder / f"{entry_key(lines, fingerprint, call)}.safetensors"
    vocab = len(tok)
    if path.is_file():
        try:
            from safetensors.torch import load_file

            tensors = load_file(path)
        except Exception:  # noqa: BLE001 — a torn or foreign file is recomputed, never trusted
            tensors = {}
        if _valid(tensors, names, vocab, rows):
            return tensors
    tensors = compute()
    _store(path, tensors, call)
    return tensors


def _store(path: Path, tensors: dict[str, torch.Tensor], call: dict) -> None:
    """Write the entry through a temporary file renamed into place (a reader sees a whole file or none); any failure
    (read-only or full disk) leaves the run uncached, not broken. Not :func:`theseus_cli.artifacts.atomic_write`:
    that one turns disk errors into the run's exit codes, and data sits below artifacts in the package layout."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"theseus": "token cache", "call": json.dumps(call)})
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 — safetensors reports a full disk as its own error type
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # gone already after the rename
