"""`polyattn.files`: atomic writes leave the old file or the new one, never half of one and no temporary; the two
answers to a failed write; the cache directory."""

import errno
from pathlib import Path

import pytest

from polyattn import files
from polyattn.errors import UserError


def test_atomic_write_replaces_whole_and_cleans_up_after_a_failed_writer(tmp_path):
    path = tmp_path / "sub" / "data.bin"
    files.atomic_write(path, lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"

    def half(f):
        f.write(b"sec")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:  # caches decide what a failed write means: the OSError as raised
        files.atomic_write(path, half)
    assert not isinstance(err.value, UserError) and err.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"first" and sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]


def test_command_outputs_fail_with_one_sentence_naming_the_path(tmp_path):
    path = tmp_path / "out.json"
    files.atomic_write_text(path, "é\n")
    assert path.read_text(encoding="utf-8") == "é\n"

    def full(tmp):
        Path(tmp).write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=rf"^Cannot write {path}: the disk is full; free some space"):
        files.atomic_save(path, full)
    assert path.read_text() == "é\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path))
    assert files.default_cache_dir() == tmp_path
    monkeypatch.delenv("POLYATTN_CACHE")
    assert files.default_cache_dir() == Path.home() / ".cache" / "polyattn"
