"""Files on disk, usable from every layer (beside errors.py and hardware.py): atomic writes, the cache directory,
and the one sentence for a write that failed.

Every write goes to a temporary file beside its target (`.NAME.*.tmp`, which `polyattn.train.checkpoint` sweeps
from run directories) and is renamed into place, so a reader never sees half a file, even after a crash. Two
kinds of caller want two answers to a failed write, and each has its function:

- `atomic_write(path, write)`: `write(f)` on a binary file. An `OSError` propagates unchanged, for callers that
  decide what a failed write means (a cache falls back to a temporary folder or only warns).
- `atomic_save(path, save)` (`save(tmp_path)`, for writers that take a file name: safetensors, matplotlib) and
  `atomic_write_text(path, text)`: a failed write is a `UserError` naming the path (`write_error`), for the
  outputs of a command (run directories, results, figures).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import UserError

_WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EACCES: "permission is denied", errno.EPERM: "permission is denied",
                 errno.EROFS: "the file system is read-only"}
WRITE_ERRNOS = frozenset(_WRITE_ERRORS)


def write_error(path: Path | str, err: OSError) -> UserError:
    """One sentence for a failed write: what, where, and what to do (free space, fix permissions)."""
    reason = _WRITE_ERRORS.get(err.errno, err.strerror or str(err))
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable location"
    return UserError(f"Cannot write {path}: {reason}; {fix} and try again (an interrupted training run "
                     f"continues from its last checkpoint with `polyattn train --resume RUN_DIR`).")


def default_cache_dir() -> Path:
    """Where decoded datasets, token files and trained tokenizers are cached: `$POLYATTN_CACHE`, else
    `~/.cache/polyattn`."""
    return Path(os.environ.get("POLYATTN_CACHE") or Path.home() / ".cache" / "polyattn")


def _replace(path: Path, save: Callable[[str], object]) -> None:
    """`save(tmp)` on a fresh temporary name beside `path`, then renames it over `path`; the temporary is removed
    on any failure, and the error propagates as raised."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], object]) -> None:
    """Calls `write(f)` on a temporary binary file beside `path`, flushed to disk, then renames it into place.
    An `OSError` propagates unchanged (the caller decides what a failed write means)."""

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    _replace(Path(path), save)


def atomic_save(path: Path | str, save: Callable[[str], object]) -> None:
    """Calls `save(tmp)` with a temporary file name beside `path`, then renames it into place; a failed write is a
    `UserError` naming `path` (`write_error`)."""
    path = Path(path)
    try:
        _replace(path, save)
    except OSError as err:
        raise write_error(path, err) from err


def atomic_write_text(path: Path | str, text: str) -> None:
    """Writes `text` atomically and flushed to disk; a failed write is a `UserError` naming `path`."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as err:
        raise write_error(path, err) from err


@contextmanager
def staged_dir(out: Path | str) -> Iterator[Path]:
    """A new folder to write a whole directory into, beside `out` (missing or empty), moved onto `out` when the
    block ends without an error and removed otherwise: a folder named `out` is always complete, whatever stopped
    the writer."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted writer with this process id left
    staging.mkdir(parents=True)
    try:
        yield staging
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["WRITE_ERRNOS", "atomic_save", "atomic_write", "atomic_write_text", "default_cache_dir", "staged_dir",
           "write_error"]
