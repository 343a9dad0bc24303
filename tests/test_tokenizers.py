"""Byte-level and BPE tokenizers, saving/loading them, and streaming decoding."""

import gzip

import numpy as np
import pytest

from polyattn.data.text import EMBEDDED
from polyattn.data.tokenizers import (
    EOS_TOKEN,
    BpeTokenizer,
    ByteTokenizer,
    StreamDecoder,
    load_run_tokenizer,
    train_bpe,
)
from polyattn.errors import UserError

TEXT = "To be, or not to be: that is the question.\nNaïve café — 東京 🎭\n"


@pytest.fixture(scope="module")
def corpus() -> str:
    with gzip.open(EMBEDDED["shakespeare"], "rt", encoding="utf-8") as f:
        return f.read(30_000)


@pytest.fixture(scope="module")
def bpe(corpus) -> BpeTokenizer:
    return train_bpe([corpus], vocab_size=400)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 256 and ids.dtype == np.int64 and len(ids) == len(TEXT.encode("utf-8"))
    assert ids.max() < 256 and tok.decode(ids) == TEXT
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # an incomplete character becomes U+FFFD, no exception


def test_bpe_learns_merges_and_round_trips_unseen_text(bpe, corpus):
    assert 257 < bpe.vocab_size <= 400 and bpe.eos_id == 0
    ids = bpe.encode(corpus[:5000])
    assert len(ids) < 0.6 * 5000  # merges learned on this text compress it
    assert bpe.decode(ids) == corpus[:5000]
    assert bpe.decode(bpe.encode(TEXT)) == TEXT  # bytes never seen in training still encode (byte alphabet)
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN
    assert len(bpe.encode("")) == 0


def test_bpe_encodes_long_text_in_pieces_without_changing_tokens(bpe, corpus, monkeypatch):
    from polyattn.data import tokenizers

    whole = bpe.encode(corpus)
    monkeypatch.setattr(tokenizers, "_ENCODE_PIECE", 700)  # cut the text into ~40 pieces at line ends
    assert np.array_equal(bpe.encode(corpus), whole)


def test_bpe_saves_and_loads_identically(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    loaded = load_run_tokenizer(tmp_path, "bpe")
    assert loaded.fingerprint() == bpe.fingerprint() and loaded.vocab_size == bpe.vocab_size
    assert np.array_equal(loaded.encode(TEXT), bpe.encode(TEXT))
    assert load_run_tokenizer(tmp_path, "byte").fingerprint() == "byte"


def test_bad_tokenizer_input_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="at least 257"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(UserError, match=r"has no tokenizer\.json"):
        load_run_tokenizer(tmp_path, "bpe")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer file"):
        load_run_tokenizer(tmp_path, "bpe")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_stream_decoder_prints_whole_characters_once(kind, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    ids = tok.encode(TEXT)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push([i]) for i in ids]
    assert "".join(pieces) + decoder.flush() == TEXT
    assert all("\ufffd" not in p for p in pieces)
