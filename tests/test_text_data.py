"""Text sources, memory-mapped token files and their cache, splits and batches."""

import gzip
import json

import numpy as np
import pytest
import torch

from polyattn.data import text as text_data
from polyattn.data.text import (
    EMBEDDED,
    build_token_file,
    eval_windows,
    load_token_file,
    pack_documents,
    pad_documents,
    random_windows,
    resolve_text_source,
    scored_range,
    shift_targets,
    split_stream,
    token_file_for_source,
)
from polyattn.data.tokenizers import ByteTokenizer, train_bpe
from polyattn.errors import UserError


def test_embedded_corpus_is_shakespeare_and_small():
    path = EMBEDDED["shakespeare"]
    assert path.stat().st_size <= 300_000
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("First Citizen:") and len(text) > 600_000
    source = resolve_text_source("shakespeare")
    assert source.num_chars() == len(text) and "".join(source.text(100)) == text[:100]


def test_sources_files_directories_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first")
    (tmp_path / ".hidden.txt").write_text("skip me")
    (tmp_path / "notes.md").write_text("not text corpus")
    source = resolve_text_source(str(tmp_path))
    assert [p.name for p in source.files] == ["b.txt", "a.txt"]
    assert ["".join(doc) for doc in source.documents()] == ["second", "first"]
    with pytest.raises(UserError, match="does not exist"):
        resolve_text_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no \.txt files"):
        resolve_text_source(str(tmp_path / "empty"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(next(resolve_text_source(str(tmp_path / "latin1.txt")).documents()))


def test_token_file_is_built_once_cached_and_memory_mapped(tmp_path, cache_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n")
    (corpus / "b.txt").write_text("héllo\n")
    tok = ByteTokenizer()
    tf = token_file_for_source(str(corpus), tok)
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    assert bytes(tf.tokens.tolist()) == "hello world\nhéllo\n".encode()
    assert tf.num_documents == 2 and bytes(tf.document(1).tolist()).decode() == "héllo\n"
    meta = json.loads(tf.path.with_suffix(".json").read_text())
    assert meta["count"] == len(tf) and meta["dtype"] == "uint16" and meta["tokenizer"] == "byte"
    assert tf.path.parent == cache_dir / "text"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached token file was rebuilt")

    monkeypatch.setattr(text_data, "build_token_file", no_rebuild)
    assert np.array_equal(token_file_for_source(str(corpus), tok).tokens, tf.tokens)
    monkeypatch.undo()

    # a truncated file is detected and rebuilt; a changed corpus gets a new file
    with open(tf.path, "r+b") as f:
        f.truncate(4)
    assert len(token_file_for_source(str(corpus), tok)) == len(tf)
    (corpus / "b.txt").write_text("changed, longer text\n")
    assert len(token_file_for_source(str(corpus), tok)) == 12 + 21


def test_pre_tokenized_bin_is_a_source_and_checks_its_tokenizer(tmp_path):
    bpe = train_bpe(["some text to learn a few merges from, text text text"], vocab_size=280)
    docs = [["some text"], ["more text"]]
    tf = build_token_file(docs, bpe, tmp_path / "corpus.bin")
    assert tf.tokens.dtype == np.uint16 and tf.num_documents == 2
    assert tf.document(0)[-1] == bpe.eos_id  # documents end with <|endoftext|>
    assert tf.tokenizer().fingerprint() == bpe.fingerprint()  # the tokenizer is stored beside the file
    same = token_file_for_source(str(tmp_path / "corpus.bin"), bpe)
    assert np.array_equal(same.tokens, tf.tokens)
    with pytest.raises(UserError, match="another tokenizer"):
        token_file_for_source(str(tmp_path / "corpus.bin"), ByteTokenizer())
    (tmp_path / "corpus.json").unlink()
    with pytest.raises(UserError, match="sidecar"):
        load_token_file(tmp_path / "corpus.bin")


def test_split_is_first_ninety_and_last_ten_percent():
    train, val = split_stream(1000, 0.1)
    assert (train.start, train.stop, val.start, val.stop) == (0, 900, 900, 1000)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="val_fraction"):
            split_stream(1000, bad)


def test_random_windows_are_a_pure_function_of_seed_epoch_step():
    tokens = np.arange(5000, dtype=np.uint16)
    x, y = random_windows(tokens, 4, 16, seed=0, epoch=2, step=7)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    again, _ = random_windows(tokens, 4, 16, seed=0, epoch=2, step=7)
    assert torch.equal(x, again)
    for other in (dict(seed=1, epoch=2, step=7), dict(seed=0, epoch=3, step=7), dict(seed=0, epoch=2, step=8)):
        assert not torch.equal(random_windows(tokens, 4, 16, **other)[0], x)
    with pytest.raises(UserError, match=r"fewer than data\.seq_len"):
        random_windows(tokens[:10], 1, 16, seed=0, epoch=0, step=0)


@pytest.mark.parametrize("n, max_tokens, stride", [(50, None, None), (49, None, None), (50, 23, None), (50, None, 3),
                                                   (50, 20, 5), (7, None, None), (9, None, 8)])
def test_eval_windows_score_every_target_once(n, max_tokens, stride):
    seq_len = 8
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(eval_windows(tokens, seq_len=seq_len, batch_size=2, max_tokens=max_tokens, stride=stride))
    first = seq_len - (stride or seq_len)
    scored, context = [], []
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] == min(seq_len, n - 1)
        for row_x, row_y in zip(x, y, strict=True):
            keep = row_y != -100
            assert torch.equal(row_y[keep], row_x[keep] + 1)  # the targets are the next tokens
            scored += row_y[keep].tolist()
            context += keep.nonzero().flatten().tolist()  # tokens before the target inside its window
    end = n - 1 if max_tokens is None else min(n - 1, first + max_tokens)
    assert scored == list(range(1 + first, 1 + end))  # every target once, in order
    if stride:
        assert all(c >= first for c in context)


def test_eval_windows_refuse_a_bad_stride():
    with pytest.raises(UserError, match=r"eval_stride must be between 1 and data\.seq_len"):
        next(eval_windows(np.arange(20), seq_len=8, batch_size=2, stride=9))


def scored_targets_and_context(tokens, seq_len, **kwargs):
    """The absolute indices of the targets the windows score (target i predicts tokens[i + 1]) and the fewest
    tokens any of them sees before it inside its window."""
    scored, least = [], None
    for x, y in eval_windows(tokens, seq_len=seq_len, batch_size=3, **kwargs):
        for row_x, row_y in zip(x, y, strict=True):
            keep = (row_y != -100).nonzero().flatten()
            assert torch.equal(row_y[keep], row_x[keep] + 1)
            scored += (row_y[keep] - 1).tolist()
            least = int(keep.min()) if least is None else min(least, int(keep.min()))
    return scored, least


def test_eval_start_scores_the_same_targets_at_every_window_length():
    # lm_long's rule at a small scale: windows of 8, 32 and 128 advanced by half their length, scoring from 64 on
    tokens = np.arange(1000, dtype=np.uint16)
    sets = {}
    for seq_len in (8, 32, 128):
        scored, least = scored_targets_and_context(tokens, seq_len, max_tokens=600, stride=seq_len // 2, start=64)
        assert len(scored) == len(set(scored))  # each target once
        assert least >= seq_len // 2  # at least half a window of context
        sets[seq_len] = scored
    assert sets[8] == sets[32] == sets[128] == list(range(64, 664))
    # without eval_start the first scored target moves with the window: the rule this setting fixes
    assert scored_targets_and_context(tokens, 8, max_tokens=600, stride=4)[0][0] == 4
    assert scored_targets_and_context(tokens, 128, max_tokens=600, stride=64)[0][0] == 64
    assert scored_range(1000, 128, 600, stride=64, start=64) == (64, 664)
    assert scored_range(1000, 128, None, stride=64) == (64, 999)  # the default: seq_len − stride, to the end


@pytest.mark.parametrize("kwargs, message", [
    (dict(start=63), r"data\.eval_start = 63 leaves less context than seq_len − eval_stride = 64 tokens"),
    (dict(start=999), r"data\.eval_start = 999 is past the last target of the evaluated split \(999 targets\)"),
    (dict(start=500, max_tokens=600), r"data\.eval_start \+ data\.eval_tokens = 500 \+ 600 runs past the 999 "
                                      r"targets.*at most 499"),
])
def test_bad_eval_start_is_one_sentence(kwargs, message):
    with pytest.raises(UserError, match=message):
        next(eval_windows(np.arange(1000), seq_len=128, batch_size=2, stride=64, **kwargs))


def test_eval_start_is_checked_with_the_config_and_before_training(cache_dir):
    from polyattn.tasks import build_job
    from polyattn.train.config import build_config

    shrink = ["data.source=shakespeare", "data.seq_len=64", "data.eval_stride=32"]
    with pytest.raises(UserError, match=r"data\.eval_start = 16 leaves less context"):
        build_config("llama_lm_shakespeare", [*shrink, "data.eval_start=16"])
    config = build_config("llama_lm_shakespeare", [*shrink, "data.eval_start=10000000"])
    with pytest.raises(UserError, match=r"data\.eval_start = 10000000 is past the last target"):
        build_job(config, device=torch.device("cpu"), splits=("train", "test"))


def test_padding_packing_and_shifted_targets():
    docs = [[1, 2, 3], [4], [5, 6]]
    x, mask = pad_documents(docs, side="left")
    assert x.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    x, mask = pad_documents(docs)
    assert x.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert shift_targets(x, mask).tolist() == [[2, 3, -100], [-100, -100, -100], [6, -100, -100]]
    packed, cu = pack_documents(docs)
    assert packed.tolist() == [[1, 2, 3, 4, 5, 6]] and cu.tolist() == [0, 3, 4, 6]
