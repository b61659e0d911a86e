"""Text corpora, tokenisers, LM chunks and sentence batches."""

import pytest
import torch

from theseus_cli.data.dataset import load_dataset
from theseus_cli.errors import DataError
from theseus_cli.config.recipe import DataConfig
from theseus_cli.batch import TokenBatch
from theseus_cli.data.text import corpus_lines, load_tokenizer, parse_bible

SNIPPET = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep. And the Spirit of God moved upon the face of the waters.

Genesis 2

  1 Thus the heavens and the earth were finished, and all the host of them.
"""


def test_bible_output_is_parsed_into_verses():
    assert parse_bible(SNIPPET) == [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep. "
        "And the Spirit of God moved upon the face of the waters.",
        "Thus the heavens and the earth were finished, and all the host of them.",
    ]


def test_whole_bible_is_read(monkeypatch):
    monkeypatch.delenv("THESEUS_BIBLE_KJV_FILE", raising=False)
    corpus_lines.cache_clear()
    verses = corpus_lines("bible-kjv", None)
    assert len(verses) == 31102  # verses in the King James Bible
    assert verses[0].startswith("In the beginning") and verses[-1].endswith("Amen.")


def test_saved_bible_file_and_missing_program(monkeypatch, tmp_path):
    saved = tmp_path / "kjv.txt"
    saved.write_text(SNIPPET)
    monkeypatch.setenv("THESEUS_BIBLE_KJV_FILE", str(saved))
    corpus_lines.cache_clear()
    assert len(corpus_lines("bible-kjv", None)) == 3
    monkeypatch.delenv("THESEUS_BIBLE_KJV_FILE")
    monkeypatch.setattr("shutil.which", lambda name: None)
    corpus_lines.cache_clear()
    with pytest.raises(DataError, match="'bible' program is missing"):
        corpus_lines("bible-kjv", None)
    corpus_lines.cache_clear()


def test_gpt2_bpe_is_the_real_one():
    tok = load_tokenizer("gpt2")
    assert len(tok) == 50257
    assert tok("In the beginning God created the heaven")["input_ids"] == [818, 262, 3726, 1793, 2727, 262, 9538]


def _text(tmp_path, n=400):
    words = "and the earth was without form void darkness upon face of deep spirit moved waters light".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(n)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lm_chunks_are_disjoint_between_splits(tmp_path):
    cfg = DataConfig(source="text", path=str(_text(tmp_path)), sequence_length=16, test_fraction=0.25)
    data = load_dataset(cfg, 0, "causal-lm")
    assert data.kind == "tokens" and data.x_train.dtype == torch.int64 and data.x_train.shape[1] == 16
    train = {tuple(r.tolist()) for r in data.x_train}
    assert not train & {tuple(r.tolist()) for r in data.x_test}
    assert data.x_train.shape[0] + data.x_test.shape[0] == data.tokens // 16
    assert data.summary()["vocab_size"] == 50257


def test_sentences_carry_their_attention_mask(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("short one\n\na much longer sentence than the first one here\n" * 5)
    cfg = DataConfig(source="text", path=str(path), sequence_length=6, test_fraction=0.2)
    data = load_dataset(cfg, 0, "sentence-embedding")
    assert isinstance(data.x_train, TokenBatch) and data.x_train.shape[1] == 6  # truncated to sequence_length
    assert len(data.x_train) + len(data.x_test) == 10  # blank lines dropped
    lengths = sorted(set(data.x_train.mask.sum(1).tolist()))
    assert lengths == [2, 6]


@pytest.mark.parametrize("content,message", [(None, "text file or folder not found"), ("", "no text")])
def test_missing_or_empty_text(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(source="text", path=str(path)), 0, "causal-lm")


def test_too_little_text_for_two_sequences(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a few words only\n")
    with pytest.raises(DataError, match="fewer than 2 sequences of 128"):
        load_dataset(DataConfig(source="text", path=str(path)), 0, "causal-lm")
