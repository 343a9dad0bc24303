"""Run directories: weights, training state and atomic file writes.

A run directory holds everything `eval`, `generate`, `sample` and `resume` need:

    config.yaml                 the resolved RunConfig (model name and every constructor argument)
    model.safetensors           final weights (written when training ends)
    checkpoints/step-XXXXXXXX/  model.safetensors + training_state.pt (optimizer, schedule, RNG, position)
    checkpoints/latest          name of the newest complete checkpoint
    metrics.jsonl               one JSON object per logged event
    tensorboard/                TensorBoard events
    plots/                      PNG curves
    summary.json                final metrics

Every file is written to a temporary name and renamed into place, and a checkpoint directory is completed
before `latest` points at it, so a run killed at any instant (even with kill -9) leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
TRAINING_STATE = "training_state.pt"
CONFIG = "config.yaml"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def save_weights(model: nn.Module, path: Path, *, model_name: str) -> None:
    """Saves the state dict as safetensors, with the registered model name in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "model": model_name}))


def load_weights(model: nn.Module, path: Path, *, model_name: str) -> None:
    """Loads safetensors weights into `model`, with one clear error for a missing, corrupted or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist; was the run finished (or use its latest checkpoint)?")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved_name = (f.metadata() or {}).get("model")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as err:
        raise UserError(f"Weights file {path} is corrupted or not a safetensors file ({err}); "
                        f"restore it or retrain.") from err
    if saved_name is not None and saved_name != model_name:
        raise UserError(f"Weights in {path} belong to model '{saved_name}', not '{model_name}'; "
                        f"use the run directory they came from.")
    result = model.load_state_dict(state, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise UserError(f"Weights in {path} do not fit model '{model_name}' (mismatched keys such as "
                        f"'{problems[0]}'); they come from a different architecture or configuration.")


class CheckpointDir:
    """The checkpoints/ folder of a run: numbered step directories plus a `latest` pointer."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, model: nn.Module, training_state: dict[str, Any], *, model_name: str,
             ema_model: nn.Module | None = None) -> Path:
        final = self.root / f"step-{step:08d}"
        if final.exists():
            return final  # this step is already checkpointed (e.g. epoch end coincides with a periodic save)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=self.root))
        try:
            save_weights(model, tmp / WEIGHTS, model_name=model_name)
            if ema_model is not None:
                save_weights(ema_model, tmp / EMA_WEIGHTS, model_name=model_name)
            _atomic_write(tmp / TRAINING_STATE, lambda p: torch.save(training_state, p))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", final.name)
        self._prune(keep_name=final.name)
        return final

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def load_state(self, path: Path) -> dict[str, Any]:
        try:
            return torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"Training state {path / TRAINING_STATE} is corrupted or unreadable ({err}); "
                            f"delete {path} to resume from an earlier checkpoint.") from err

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step-*"):  # temporaries left by a killed run
            shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store it as a tensor
        "numpy": [torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value):
    """torch.load(weights_only=True) returns lists where random/numpy states need tuples."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value
