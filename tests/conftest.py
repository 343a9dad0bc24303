import hashlib
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Under pytest-xdist (`make test`) every worker would otherwise start one torch thread per core, and N workers on N
# cores would fight over them: each worker (and the commands its tests start) gets its share of the cores instead.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ["OMP_NUM_THREADS"] = str(_share)


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


TINY_LM = ["model=llama_lm_nano", "model.dim=64", "model.depth=1", "model.num_heads=4", "data.seq_len=16",
           "train.batch_size=4", "data.eval_batch_size=8", "data.eval_tokens=200", "train.progress=false",
           "train.precision=fp32", "train.max_steps=2"]
"""The overrides of `tiny_lm_run`: a one-block LLaMA LM on the embedded Shakespeare, two optimizer steps."""


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory):
    """A trained run directory (TINY_LM) that the deploy tests export, quantize and prune into directories of
    their own. Trained once per session; a test that changes anything inside it fails at teardown, since every
    later test would then read another run."""
    from polyattn.train.config import build_config
    from polyattn.train.loop import train

    out = tmp_path_factory.mktemp("runs")
    train(build_config("llama_lm_shakespeare", [*TINY_LM, f"train.out_dir={out}", "train.run_name=lm"]),
          evaluate=False)
    run = out / "lm"
    before = _tree_digest(run)
    yield run
    assert _tree_digest(run) == before, f"a test changed the shared run directory {run}; write beside it"


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
