"""Tokenised corpora kept on disk between processes: a hit gives exactly the computed tokens, a changed input is a new
entry, a bad file is recomputed, and a cache that cannot be used never breaks a run."""

import pytest
import torch
from safetensors.torch import save_file

from theseus_cli.data import text
from theseus_cli.data.token_cache import cache_folder, tokenizer_fingerprint

VERSES = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light: and there was light.",
          "And God saw the light, that it was good.", "Amen."]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A three-verse text corpus and a cache folder of its own; the per-process caches emptied around the test."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(VERSES))
    monkeypatch.setenv("THESEUS_CACHE_DIR", str(tmp_path / "cache"))
    for cached in (text.corpus_lines, text.corpus_stream, text.corpus_sentences):
        cached.cache_clear()
    yield path
    for cached in (text.corpus_lines, text.corpus_stream, text.corpus_sentences):
        cached.cache_clear()


def _fresh_process():
    """What a new process sees: nothing tokenised in memory, only what is on disk."""
    text.corpus_stream.cache_clear()
    text.corpus_sentences.cache_clear()


def _entries(corpus) -> list:
    return sorted((corpus.parent / "cache" / "tokens").glob("*.safetensors"))


def _counting(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(text, name)
    monkeypatch.setattr(text, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_second_process_reads_the_stored_tokens_instead_of_tokenising(corpus, monkeypatch):
    calls = _counting(monkeypatch, "tokenize_stream")
    first = text.corpus_stream("text", str(corpus), "gpt2", None)
    assert calls == [1] and len(_entries(corpus)) == 1
    assert first[:3].tolist() == [818, 262, 3726]  # "In the beginning" in GPT-2's BPE
    _fresh_process()
    again = text.corpus_stream("text", str(corpus), "gpt2", None)
    assert calls == [1] and torch.equal(again, first) and again.dtype == torch.int64
    sentences = _counting(monkeypatch, "tokenize_sentences")
    batch = text.corpus_sentences("text", str(corpus), "gpt2", None, 8)
    _fresh_process()
    cached = text.corpus_sentences("text", str(corpus), "gpt2", None, 8)
    assert sentences == [1] and torch.equal(cached.ids, batch.ids) and torch.equal(cached.mask, batch.mask)
    assert batch.ids.shape == (4, 8) and not bool(batch.mask.all())  # truncated to 8, padded where shorter


def test_an_edited_corpus_or_another_call_is_a_new_entry(corpus, monkeypatch):
    calls = _counting(monkeypatch, "tokenize_sentences")
    text.corpus_sentences("text", str(corpus), "gpt2", None, 8)
    _fresh_process()
    text.corpus_sentences("text", str(corpus), "gpt2", None, 12)  # another max_length
    corpus.write_text("\n".join(VERSES[:2]))
    text.corpus_lines.cache_clear()
    _fresh_process()
    edited = text.corpus_sentences("text", str(corpus), "gpt2", None, 8)
    assert calls == [1, 1, 1] and len(_entries(corpus)) == 3 and len(edited) == 2


def test_the_fingerprint_ignores_the_last_calls_padding_but_not_the_vocabulary():
    tok = text.load_tokenizer("gpt2")
    before = tokenizer_fingerprint(tok)
    tok(VERSES, truncation=True, max_length=4, padding="longest")  # leaves truncation/padding set on the backend
    assert tokenizer_fingerprint(tok) == before
    other = tok.__class__(vocab={**tok.get_vocab(), "extra": len(tok)}, merges=[])
    assert tokenizer_fingerprint(other) != before


@pytest.mark.parametrize("damage", ["torn", "ids outside the vocabulary", "wrong tensors"])
def test_a_bad_file_is_recomputed_and_replaced(corpus, monkeypatch, damage):
    good = text.corpus_stream("text", str(corpus), "gpt2", None).clone()
    (entry,) = _entries(corpus)
    if damage == "torn":
        entry.write_bytes(entry.read_bytes()[:40])
    elif damage == "wrong tensors":
        save_file({"other": good}, str(entry))
    else:
        save_file({"ids": good + 60_000}, str(entry))
    calls = _counting(monkeypatch, "tokenize_stream")
    _fresh_process()
    assert torch.equal(text.corpus_stream("text", str(corpus), "gpt2", None), good) and calls == [1]
    _fresh_process()
    assert torch.equal(text.corpus_stream("text", str(corpus), "gpt2", None), good) and calls == [1]  # rewritten whole


def test_off_or_an_unwritable_folder_tokenises_as_without_a_cache(corpus, monkeypatch, tmp_path):
    expected = text.tokenize_stream(tuple(VERSES), text.load_tokenizer("gpt2"))
    monkeypatch.setenv("THESEUS_CACHE_DIR", "off")
    assert cache_folder() is None
    assert torch.equal(text.corpus_stream("text", str(corpus), "gpt2", None), expected)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("THESEUS_CACHE_DIR", str(blocker))  # tokens/ cannot be created under a file
    _fresh_process()
    assert torch.equal(text.corpus_stream("text", str(corpus), "gpt2", None), expected)
    assert not (corpus.parent / "cache").exists() and blocker.read_text() == "not a folder"


def test_the_default_folder_follows_xdg_and_the_home(monkeypatch, tmp_path):
    monkeypatch.delenv("THESEUS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "theseus" / "tokens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "theseus" / "tokens"
    monkeypatch.setattr("pathlib.Path.home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert cache_folder() is None  # no home folder: no cache, no error
