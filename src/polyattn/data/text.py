"""Text corpora as memory-mapped token streams, and the batches a language model trains on.

Sources accepted by `token_file_for_source`:

- `"shakespeare"`: the embedded default corpus (650 KB of Shakespeare's plays, public domain; see
  `corpus/README.md`), no download;
- a text file (UTF-8), one document;
- a directory: every `*.txt` file below it (sorted, hidden files skipped), one document each;
- a pre-tokenized token file `NAME.bin` with its sidecar `NAME.json` (as written by `build_token_file`).

A corpus is tokenized once into a token file in the cache (`$POLYATTN_CACHE` or `~/.cache/polyattn`, under
`text/`), keyed by the source's path, sizes and modification times and by the tokenizer's fingerprint, then
memory-mapped and streamed as often as needed. Sources must be regular files (a device, FIFO or socket such as
/dev/zero never ends), and a file is read only up to the size it had when the source was resolved (a file that
keeps growing is cut there); decompressed .gz text is capped at `MAX_TEXT_BYTES`. A cached token file whose
bytes no longer match the checksum in its sidecar is rebuilt, like the image caches. A token file is three
files written atomically (temporary name, then rename), the sidecar last, so a half-written file is never read:

    NAME.bin        the token ids, np.uint16 when the vocabulary fits, else np.uint32
    NAME.docs.npy   int64 `[D + 1]` document offsets into the stream
    NAME.json       {"format", "tokenizer", "tokenizer_kind", "dtype", "count", "documents", "source", "sha256"}

With a BPE tokenizer, `NAME.tokenizer.json` sits beside them so the file can be used on its own. Documents are
followed by the tokenizer's end-of-text id when it has one (BPE); byte-level streams are the bytes of the
documents back to back.

Batches (pure functions of their arguments, so a resumed run draws the same batches):

- `random_windows`: training windows of `seq_len + 1` tokens at positions drawn from `(seed, epoch, step)`;
- `eval_windows`: consecutive windows that predict every token of a split exactly once;
- `pad_documents` / `pack_documents`: variable-length documents as a padded batch with a mask, or packed into
  one row with `cu_seqlens` boundaries (flash-attn varlen layout).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write, default_cache_dir
from ..ops.losses import IGNORE_INDEX
from .config import check_eval_start
from .images import CappedReader
from .tokenizers import BpeTokenizer, ByteTokenizer, Tokenizer

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
EMBEDDED = {"shakespeare": CORPUS_DIR / "shakespeare.txt.gz"}
TOKEN_FORMAT_VERSION = 1

_READ_CHUNK = 8 << 20  # characters per piece when reading a large text file
MAX_TEXT_BYTES = 64 << 30
"""Most bytes of text read from one compressed file (a decompression bomb otherwise fills the disk)."""


# ---- sources ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextSource:
    """A resolved text source: what to read and a fingerprint that changes when the files change."""

    name: str
    files: tuple[Path, ...]
    fingerprint: str

    sizes: tuple[int, ...] = ()
    """Bytes of each file when the source was resolved: what is read of it (see the module docstring)."""

    def documents(self) -> Iterator[Iterator[str]]:
        """One iterator of text pieces per document (pieces end at line breaks, so no word is cut)."""
        for i, path in enumerate(self.files):
            yield _read_pieces(path, self.sizes[i] if i < len(self.sizes) and path.suffix != ".gz" else None)

    def text(self, max_chars: int | None = None) -> Iterator[str]:
        """The corpus as text pieces, documents back to back, stopping after `max_chars` characters."""
        left = max_chars
        for doc in self.documents():
            for piece in doc:
                if left is not None:
                    piece = piece[:left]
                    left -= len(piece)
                yield piece
                if left is not None and left <= 0:
                    return

    def num_chars(self) -> int:
        return sum(len(piece) for doc in self.documents() for piece in doc)


def resolve_text_source(source: str) -> TextSource:
    """The `TextSource` for an embedded name, a text file or a directory of `.txt` files."""
    if source in EMBEDDED:
        return TextSource(source, (EMBEDDED[source],), f"embedded:{source}")
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"The text source '{source}' does not exist; give a text file, a directory of .txt "
                        f"files, a token file (.bin), or 'shakespeare' (embedded).")
    path = path.resolve()
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*.txt") if p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        if not files:
            raise UserError(f"The directory '{source}' holds no .txt files; put the corpus in .txt files or "
                            f"pass one text file.")
    else:
        files = (path,)
    for f in files:
        if not f.is_file():  # is_file follows links and is False for devices, FIFOs and sockets
            raise UserError(f"The text source {f} is not a regular file (a device, FIFO or socket can be endless); "
                            f"copy the text into a file and pass that.")
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return TextSource(str(path), files, hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32],
                      tuple(size for _, size, _ in stats))


def _read_pieces(path: Path, max_bytes: int | None = None) -> Iterator[str]:
    """Text pieces of a file: at most `max_bytes` bytes of a plain file, `MAX_TEXT_BYTES` of decompressed .gz."""
    limit = MAX_TEXT_BYTES if max_bytes is None else max_bytes
    try:
        raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
        too_long = None
        if max_bytes is None:
            too_long = lambda: UserError(f"{path} decompresses to more than {MAX_TEXT_BYTES / 2**30:g} GiB of "
                                         f"text; split it into smaller files.")
        capped = io.BufferedReader(CappedReader(raw, limit, too_long))
        with raw, io.TextIOWrapper(capped, encoding="utf-8", newline="") as f:
            carry = ""
            while True:
                block = f.read(_READ_CHUNK)
                if not block:
                    break
                block = carry + block
                cut = block.rfind("\n") + 1
                if cut == 0:  # no line break in 8M characters: cut anywhere
                    cut = len(block)
                yield block[:cut]
                carry = block[cut:]
            if carry:
                yield carry
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8.") \
            from None


# ---- token files -----------------------------------------------------------------------------------------

@dataclass
class TokenFile:
    """A memory-mapped token stream with its document offsets.

    Attributes:
        tokens: `[N]` np.memmap (uint16 or uint32), read-only.
        doc_offsets: `[D + 1]` int64; document `i` is `tokens[doc_offsets[i]:doc_offsets[i + 1]]`.
        meta: the sidecar JSON.
        path: the `.bin` file.
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray
    meta: dict
    path: Path

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the file was written with (byte-level, or the BPE model stored beside it)."""
        if self.meta["tokenizer_kind"] == "byte":
            return ByteTokenizer()
        side = _side(self.path, ".tokenizer.json")
        if not side.is_file():
            raise UserError(f"Token file {self.path} was written with a BPE tokenizer but {side.name} is missing "
                            f"beside it; restore it or rebuild the token file.")
        return BpeTokenizer.load(side)


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".bin") + suffix)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_token_file(documents: Iterable[Iterable[str]], tokenizer: Tokenizer, path: str | Path, *,
                     source: str = "") -> TokenFile:
    """Tokenizes `documents` (each an iterable of text pieces) into the token file `path` (`NAME.bin`).

    Tokens are written as they are produced, so a corpus larger than memory needs only one piece at a time.
    """
    path = Path(path)
    dtype = token_dtype(tokenizer.vocab_size)
    offsets = [0]

    digest = hashlib.sha256()

    def write_tokens(f):
        count = 0
        for doc in documents:
            for piece in doc:
                data = tokenizer.encode(piece).astype(dtype).tobytes()
                f.write(data)
                digest.update(data)
                count += len(data) // dtype.itemsize
            if tokenizer.eos_id is not None:
                data = np.asarray([tokenizer.eos_id], dtype=dtype).tobytes()
                f.write(data)
                digest.update(data)
                count += 1
            offsets.append(count)

    atomic_write(path, write_tokens)
    atomic_write(_side(path, ".docs.npy"), lambda f: np.save(f, np.asarray(offsets, dtype=np.int64)))
    if isinstance(tokenizer, BpeTokenizer):
        atomic_write(_side(path, ".tokenizer.json"), lambda f: f.write(tokenizer.to_str().encode()))
    meta = {"format": TOKEN_FORMAT_VERSION, "tokenizer": tokenizer.fingerprint(), "tokenizer_kind": tokenizer.kind,
            "dtype": dtype.name, "count": offsets[-1], "documents": len(offsets) - 1, "source": source,
            "sha256": digest.hexdigest()}
    atomic_write(_side(path, ".json"), lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    return load_token_file(path)


def load_token_file(path: str | Path) -> TokenFile:
    """Memory-maps a token file written by `build_token_file`; a clear error if it is incomplete or damaged."""
    path = Path(path)
    sidecar = _side(path, ".json")
    try:
        meta = json.loads(sidecar.read_text())
        dtype = np.dtype(meta["dtype"])
        count = int(meta["count"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"Token file {path} has no readable sidecar {sidecar.name} ({err}); rebuild it with "
                        f"build_token_file.") from None
    if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
        raise UserError(f"Token file {path} does not hold the {count} {dtype.name} tokens its sidecar announces; "
                        f"it is truncated or from another build, so rebuild it.")
    if "sha256" in meta and _file_sha256(path) != meta["sha256"]:
        raise UserError(f"Token file {path} does not match the checksum in its sidecar; it was damaged after it "
                        f"was written, so rebuild it.")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)
    docs_path = _side(path, ".docs.npy")
    try:
        offsets = np.load(docs_path) if docs_path.is_file() else np.asarray([0, count], dtype=np.int64)
    except (OSError, ValueError) as err:
        raise UserError(f"Token file {path} has an unreadable {docs_path.name} ({err}); rebuild it.") from None
    if (offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != count
            or np.any(np.diff(offsets) < 0)):
        raise UserError(f"Token file {path} has document offsets ({docs_path.name}) that do not fit its {count} "
                        f"tokens; rebuild it.")
    return TokenFile(tokens, offsets, meta, path)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def token_file_for_source(source: str, tokenizer: Tokenizer, *, cache_dir: str | Path | None = None) -> TokenFile:
    """The token file of a text source with `tokenizer`: built on first use and cached, or the `.bin` given."""
    path = Path(source).expanduser()
    if path.suffix == ".bin" and source not in EMBEDDED:
        if not path.is_file():
            raise UserError(f"The token file '{source}' does not exist.")
        tf = load_token_file(path)
        if tf.meta["tokenizer"] != tokenizer.fingerprint():
            raise UserError(f"Token file {source} was written with another tokenizer ({tf.meta['tokenizer']}) than "
                            f"this run's ({tokenizer.fingerprint()}); rebuild it or train with its own tokenizer.")
        return tf
    text = resolve_text_source(source)
    key_fields = [TOKEN_FORMAT_VERSION, text.name, text.fingerprint, tokenizer.fingerprint()]
    key = hashlib.sha256(json.dumps(key_fields).encode()).hexdigest()[:32]
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "text"
    file = cache / f"{key}.bin"
    try:
        return load_token_file(file)
    except UserError:
        pass  # absent or damaged: (re)build it
    try:
        return build_token_file(text.documents(), tokenizer, file, source=text.name)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            # a full disk (or a failing one) is not helped by writing elsewhere, which may be the same disk
            raise UserError(f"Cannot write the token cache {file} ({err.strerror or err}); free space or set "
                            f"POLYATTN_CACHE to a directory with room.") from None
        warnings.warn(f"Could not write the token cache {file} ({err}); tokenizing into a temporary file.",
                      stacklevel=2)
        tmp = Path(tempfile.mkdtemp(prefix="polyattn-tokens-")) / "tokens.bin"
        try:
            return build_token_file(text.documents(), tokenizer, tmp, source=text.name)
        except OSError as err2:
            shutil.rmtree(tmp.parent, ignore_errors=True)
            raise UserError(f"Cannot write the token cache {file} ({err}) nor a temporary one in {tmp.parent} "
                            f"({err2.strerror or err2}); set POLYATTN_CACHE to a writable directory with room.") \
                from None


def split_stream(n: int, val_fraction: float) -> tuple[slice, slice]:
    """Train / validation ranges of a stream of `n` tokens: the first `1 − val_fraction` and the rest."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive) for text, the held-out tail of "
                        f"the token stream (0.1 is usual), got {val_fraction}.")
    n_val = round(n * val_fraction)
    return slice(0, n - n_val), slice(n - n_val, n)


# ---- batches ---------------------------------------------------------------------------------------------

def window_starts(n: int, batch_size: int, seq_len: int, *, seed: int, epoch: int, step: int) -> np.ndarray:
    """Start positions `[batch_size]` of training windows of `seq_len + 1` tokens in a stream of `n` tokens.

    A pure function of `(seed, epoch, step)` (numpy's `SeedSequence` mixes the three without collisions), so a
    run resumed at any step draws the windows the uninterrupted run drew.
    """
    if n < seq_len + 1:
        raise UserError(f"The training split has {n} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; use a "
                        f"larger corpus or a shorter data.seq_len.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, step]))
    return rng.integers(0, n - seq_len, size=batch_size)


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int, epoch: int,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets `([B, L], [B, L])` int64 of random windows (see `window_starts`)."""
    starts = window_starts(len(tokens), batch_size, seq_len, seed=seed, epoch=epoch, step=step)
    windows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def scored_range(n: int, seq_len: int, max_tokens: int | None = None, *, stride: int | None = None,
                 start: int | None = None) -> tuple[int, int]:
    """`(first, end)`: the targets `first ≤ i < end` that `eval_windows` scores in a stream of `n` tokens (target
    `i` predicts `tokens[i + 1]`), or one clear error when there are none or the settings leave too little context.

    `start` (data.eval_start) pins the first scored target, so windows of any length score the same targets;
    None starts at `seq_len − stride`, the first target a window of `seq_len` tokens can score with
    `seq_len − stride` tokens before it. With `start`, `max_tokens` must fit the stream after it."""
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise UserError(f"data.eval_stride must be between 1 and data.seq_len ({seq_len}), got {stride}.")
    context = seq_len - stride
    check_eval_start(start, context)
    first = context if start is None else start
    end = n - 1
    if start is not None and start >= end:
        raise UserError(f"data.eval_start = {start} is past the last target of the evaluated split ({end} "
                        f"targets); set data.eval_start below {end}.")
    if start is not None and max_tokens is not None and start + max_tokens > end:
        raise UserError(f"data.eval_start + data.eval_tokens = {start} + {max_tokens} runs past the {end} targets "
                        f"of the evaluated split; lower data.eval_tokens to at most {end - start}.")
    if max_tokens is not None:
        end = min(end, first + max_tokens)
    if end <= first:
        raise UserError(f"The evaluated split holds {n} tokens, too few to score any after "
                        f"seq_len − eval_stride = {first} tokens of context; lower data.seq_len or raise "
                        f"data.eval_stride.")
    return first, end


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None, *,
                 stride: int | None = None, start: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows `([b, l], [b, l])` over the stream that score each target once; unscored targets are
    `IGNORE_INDEX`.

    Windows of `seq_len` tokens advance by `stride` (default `seq_len`: consecutive windows) and score their
    last `stride` targets, the first window all of its own from the first scored target on: position
    `seq_len − stride` by default, or `start` (data.eval_start, at least `seq_len − stride`). Every scored
    target therefore sees at least `seq_len − stride` tokens before it, and the targets before the first are not
    scored, whichever model reads the windows: so a model that only predicts a window's last positions (Perceiver
    AR's latents) and one that predicts all of them are scored on the same targets with the same context, and
    with one `start` windows of different lengths score the same targets too. At most `max_tokens` targets are
    scored (see `scored_range`). The last window ends at the end of the scored range (it is full length when the
    stream allows, and re-reads tokens it does not score)."""
    stride = seq_len if stride is None else stride
    first, end = scored_range(len(tokens), seq_len, max_tokens, stride=stride, start=start)
    windows = []  # (window start a, first scored target) with the window's targets tokens[a + 1 : a + l + 1]
    scored_to = first
    while scored_to < end:
        windows.append((max(0, min(scored_to + stride, end) - seq_len), scored_to))
        scored_to = min(scored_to + stride, end)
    length = min(seq_len, end)
    for i in range(0, len(windows), batch_size):
        rows = windows[i:i + batch_size]
        w = torch.from_numpy(np.stack([np.asarray(tokens[a:a + length + 1], dtype=np.int64) for a, _ in rows]))
        x, y = w[:, :-1], w[:, 1:].clone()
        for r, (a, b) in enumerate(rows):
            y[r, :b - a] = IGNORE_INDEX  # targets before this window's share were scored by an earlier one
            y[r, min(a + length, end) - a:] = IGNORE_INDEX
        yield x, y


def pad_documents(docs: Sequence[Sequence[int] | np.ndarray | torch.Tensor], *, side: str = "right",
                  pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents of different lengths as `(tokens [B, T_max], mask [B, T_max])`, mask True = real token.

    `side="left"` aligns the ends (prompts for generation), `"right"` the starts (training).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    seqs = [torch.as_tensor(np.asarray(d, dtype=np.int64)) for d in docs]
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        tokens[i, where], mask[i, where] = s, True
    return tokens, mask


def pack_documents(docs: Sequence[Sequence[int] | np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents packed into one row: `(tokens [1, ΣT], cu_seqlens [D + 1] int64)` (flash-attn varlen)."""
    seqs = [torch.as_tensor(np.asarray(d, dtype=np.int64)) for d in docs]
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    return torch.cat(seqs)[None], cu


def shift_targets(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets of a `[B, T]` batch: `targets[:, t] = tokens[:, t + 1]`, `IGNORE_INDEX` where the next
    token is padding or past the end."""
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, :-1] = tokens[:, 1:]
    if mask is not None:
        targets[:, :-1] = targets[:, :-1].masked_fill(~mask[:, 1:].bool(), IGNORE_INDEX)
        targets = targets.masked_fill(~mask.bool(), IGNORE_INDEX)
    return targets


__all__ = ["EMBEDDED", "IGNORE_INDEX", "TextSource", "TokenFile", "build_token_file", "eval_windows",
           "load_token_file", "pack_documents", "pad_documents", "random_windows", "resolve_text_source",
           "scored_range", "shift_targets", "split_stream", "token_file_for_source", "window_starts"]
