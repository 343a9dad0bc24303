"""Tokenizers for text models: byte-level (nothing to train) and byte-level BPE trained on the user's corpus.

Both map text to integer ids and back through the same small interface (`Tokenizer`):

- `ByteTokenizer`: the UTF-8 bytes of the text, 256 ids, no special tokens. Bits per byte equal bits per token.
- `BpeTokenizer`: byte-level BPE (GPT-2 style, arXiv 1508.07909) trained with Hugging Face `tokenizers` on
  the training text, with one special token `<|endoftext|>` (id 0) that separates documents. It is saved as
  `tokenizer.json` in the run directory, so `eval`, `generate` and `resume` need nothing else. The
  `tokenizers` package is imported only when BPE is used (`pip install 'polyattn[text]'`).

`StreamDecoder` turns ids produced one at a time into text as soon as it is complete, never printing half of a
multi-byte character.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import UserError
from ..files import atomic_write

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("byte", "bpe")


class Tokenizer(Protocol):
    """What the data pipeline, the task and `polyattn generate` need from a tokenizer."""

    kind: str
    """'byte' or 'bpe'."""
    vocab_size: int
    eos_id: int | None
    """Document separator id, or None (byte-level: documents are joined by their own newlines)."""

    def encode(self, text: str) -> np.ndarray:
        """Token ids `[N]` (int64) of `text`."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        ...

    def fingerprint(self) -> str:
        """A string that changes whenever the id mapping changes (keys the token-file cache)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids `0..255`; there is nothing to train or save."""

    kind = "byte"
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def _hf():
    try:
        import tokenizers
    except ImportError:
        raise UserError("BPE tokenization needs the Hugging Face 'tokenizers' package; install it with "
                        "pip install 'polyattn[text]', or use data.tokenizer=byte.") from None
    return tokenizers


# Long texts are encoded in pieces cut at line ends, so one call never holds a whole corpus' encodings. The
# byte-level pre-tokenizer never merges across a newline followed by text, so the cut changes no token.
_ENCODE_PIECE = 1 << 20


class BpeTokenizer:
    """Byte-level BPE from Hugging Face `tokenizers`; build one with `train_bpe` or `BpeTokenizer.load`."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def load(cls, path: str | Path) -> BpeTokenizer:
        """Reads a `tokenizer.json` written by `save` (or any Hugging Face byte-level BPE tokenizer file)."""
        hf = _hf()
        try:
            return cls(hf.Tokenizer.from_file(str(path)))
        except Exception as err:
            raise UserError(f"{path} is not a readable tokenizer file ({err}); restore it from the run "
                            f"directory it came from.") from err

    def save(self, path: str | Path) -> None:
        """Writes `tokenizer.json` atomically."""
        atomic_write(Path(path), lambda f: f.write(self._tok.to_str().encode()))

    def to_str(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> np.ndarray:
        pieces, start = [], 0
        while start < len(text):
            end = text.find("\n", start + _ENCODE_PIECE)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(pieces, add_special_tokens=False)]
        return np.concatenate(ids)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Trains byte-level BPE on `texts` (an iterable of documents or chunks).

    The 256 byte symbols and `<|endoftext|>` are always in the vocabulary, so any text can be encoded;
    `vocab_size` counts them. A small corpus may stop short of `vocab_size` (no pair left to merge).
    """
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise UserError(f"data.vocab_size must be at least 257 for BPE (256 bytes + {EOS_TOKEN}), got "
                        f"{vocab_size!r}.")
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)


def load_run_tokenizer(run_dir: str | Path, kind: str) -> Tokenizer:
    """The tokenizer of a run directory: byte-level, or the BPE model saved in its `tokenizer.json`."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise UserError(f"Unknown tokenizer '{kind}'; use one of {', '.join(TOKENIZER_KINDS)}.")
    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {TOKENIZER_FILE}, which its BPE model needs; restore the file or "
                        f"retrain the run.")
    return BpeTokenizer.load(path)


class StreamDecoder:
    """Text from ids that arrive one at a time: `push(ids)` returns only the newly completed text.

    The whole sequence is decoded again at each push (cheap next to a model step) and the decoded text grows
    only when it does not end in U+FFFD, so a multi-byte character split over several tokens is printed once,
    whole.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        new = text[self.emitted:]
        self.emitted = len(text)
        return new


__all__ = ["EOS_TOKEN", "TOKENIZER_FILE", "BpeTokenizer", "ByteTokenizer", "StreamDecoder", "Tokenizer",
           "load_run_tokenizer", "train_bpe"]
