import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(42)
    yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Keeps decoded-dataset caches of a test inside its temporary directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("POLYATTN_CACHE", str(path))
    return path


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
