"""Run directories: weights, training state, checkpoints (files are written with `polyattn.files`).

A run directory holds everything `eval`, `generate`, `sample` and `resume` need:

    config.yaml                 the resolved RunConfig (model name and every constructor argument)
    config.original.yaml        the first config, kept when a resumed run changed settings
    model.safetensors           final weights (written when training ends)
    checkpoints/step-XXXXXXXX/  model.safetensors + training_state.pt (optimizer, schedule, RNG, position)
                                + manifest.json (size and SHA-256 of each file, written last); a distributed
                                run's: the model and optimizer as a torch.distributed.checkpoint (DCP) folder
                                (.metadata + one __R_0.distcp per process) instead of model.safetensors and
                                the optimizer inside training_state.pt (see `CheckpointDir.save_distributed`)
    checkpoints/latest          name of the newest complete checkpoint (for people; resume reads the folders)
    .lock                       held (fcntl) by the one process training in the directory
    metrics.jsonl               one JSON object per logged event
    tensorboard/                TensorBoard events
    plots/                      PNG curves
    summary.json                final metrics

Every file is written to a temporary name and renamed into place, and a checkpoint directory is completed
before `latest` points at it, so a run killed at any instant (even with kill -9) leaves the previous
checkpoint intact. A checkpoint whose files do not match its manifest (a disk error, a truncated copy) is
skipped on resume in favour of the newest intact one, with a note saying which was used; temporaries left by
an interrupted write are removed when the run directory is next opened. A full disk or an unwritable path is
one sentence naming the path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..files import atomic_save, atomic_write_text, write_error

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
TRAINING_STATE = "training_state.pt"
CONFIG = "config.yaml"
ORIGINAL_CONFIG = "config.original.yaml"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
"""The file that makes a checkpoint a DCP one (torch.distributed.checkpoint's index of the shards' files)."""
LOCK = ".lock"
_STEP_NAME = re.compile(r"step-\d{8}")

def save_weights(model: nn.Module | dict[str, torch.Tensor], path: Path, *, model_name: str) -> None:
    """Saves the state dict (of `model`, or `model` itself when it is one) as safetensors, with the registered
    model name in the metadata."""
    from safetensors.torch import save_file

    items = model.items() if isinstance(model, dict) else model.state_dict().items()
    state = {k: v.detach().contiguous().cpu() for k, v in items}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "model": model_name}))


def load_weights(model: nn.Module, path: Path, *, model_name: str) -> None:
    """Loads safetensors weights into `model`, with one clear error for a missing, corrupted or foreign file."""
    state = read_weights(model, path, model_name=model_name)
    from .sharding import is_sharded

    if is_sharded(model):  # each process takes its shards of the full tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def read_weights(model: nn.Module, path: Path, *, model_name: str) -> dict[str, torch.Tensor]:
    """The safetensors weights at `path`, checked to fit `model` (names and shapes), else one clear error for a
    missing, corrupted or foreign file."""
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
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state))
    if problems:
        raise UserError(f"Weights in {path} do not fit model '{model_name}' (mismatched keys such as "
                        f"'{problems[0]}'); they come from a different architecture or configuration.")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise UserError(f"Weights in {path} do not fit model '{model_name}': '{key}' has shape "
                            f"{list(tensor.shape)} but the config builds {list(expected[key].shape)}; the config "
                            f"(e.g. a width or the number of classes) differs from the one they were trained with.")
    return state


def load_checkpoint_weights(model: nn.Module, path: Path, *, model_name: str) -> None:
    """Loads the model weights of a checkpoint folder into a plain `model`, whichever layout it has (one process's
    safetensors, or a distributed run's DCP shards, read here by this process alone)."""
    if not CheckpointDir.is_distributed(path):
        load_weights(model, Path(path) / WEIGHTS, model_name=model_name)
        return
    state = {"model": model.state_dict()}
    try:
        _dcp_load(state, path)
    except Exception as err:
        raise UserError(f"Checkpoint {path} does not fit model '{model_name}' or is unreadable ({err}); use the "
                        f"run directory it came from, or delete it to use an earlier checkpoint.") from err
    model.load_state_dict(state["model"])


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """`torch.distributed.checkpoint.load` of `state` in place from the checkpoint folder `path`: by every process
    of the group, each reading its shards, or by this process alone when there is no group (which DCP would warn
    about: here it is the intent)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(path))


class CheckpointDir:
    """The checkpoints/ folder of a run: numbered step directories plus a `latest` pointer."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, model: nn.Module, training_state: dict[str, Any], *, model_name: str,
             ema_model: nn.Module | None = None) -> Path:
        final = self.root / f"step-{step:08d}"
        if final.exists():
            if self.check(final) is None:
                return final  # this step is already checkpointed (e.g. epoch end coincides with a periodic save)
            shutil.rmtree(final)  # a damaged copy (from before a resume): replace it
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=self.root))
        except OSError as err:
            raise write_error(self.root, err) from err
        try:
            save_weights(model, tmp / WEIGHTS, model_name=model_name)
            if ema_model is not None:
                save_weights(ema_model, tmp / EMA_WEIGHTS, model_name=model_name)
            atomic_save(tmp / TRAINING_STATE, lambda p: torch.save(training_state, p))
            manifest = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            os.replace(tmp, final)
        except (OSError, UserError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = err if isinstance(err, OSError) else err.__cause__
            if not isinstance(cause, OSError):
                raise
            raise write_error(final, cause) from cause  # name the checkpoint, not its temporary folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", final.name)
        self._prune(keep_name=final.name)
        return final

    def save_distributed(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                         training_state: dict[str, Any], *, model_name: str,
                         ema_model: nn.Module | None = None) -> Path:
        """`save` for a run of several processes, called by every process at the same step: the model and the
        optimizer go through torch.distributed.checkpoint (each process writes its shards, `__R_0.distcp`, rank
        0 the `.metadata` index), so a sharded (FSDP) model is never gathered; any number of processes, one
        included, loads them back (`load_training`), each taking its own shards. Beside them rank 0 writes the
        rest of the training state, with every process's random state (`rank_rng`), and the manifest; the folder
        is written under a temporary name and renamed as in `save`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .. import distributed

        main = distributed.is_main()
        final = self.root / f"step-{step:08d}"
        plan: tuple[str, str, int]
        if not main:
            plan = ("", "", 0)
        elif final.exists() and self.check(final) is None:
            plan = ("done", str(final), 0)  # this step is already checkpointed
        else:
            try:
                if final.exists():
                    shutil.rmtree(final)  # a damaged copy (from before a resume): replace it
                self.root.mkdir(parents=True, exist_ok=True)
                plan = ("write", tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=self.root), 0)
            except OSError as err:
                plan = ("error", err.strerror or str(err), err.errno or 0)
        plan = distributed.broadcast(plan)  # every process writes into rank 0's temporary folder
        if plan[0] == "done":
            return final
        if plan[0] == "error":
            raise write_error(final, OSError(plan[2], plan[1]))
        tmp = Path(plan[1])
        rank_rng = [_from_bytes(b) for b in distributed.all_gather(_to_bytes(training_state["rng"]))]
        model_state, optimizer_state = get_state_dict(model, optimizer)
        try:
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
            if main:
                if ema_model is not None:
                    save_weights(ema_model, tmp / EMA_WEIGHTS, model_name=model_name)
                state = {**training_state, "rank_rng": rank_rng}
                atomic_save(tmp / TRAINING_STATE, lambda p: torch.save(state, p))
                manifest = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
                atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
                os.replace(tmp, final)
        except OSError as err:  # the others stop on the missing barrier, within train.collective_timeout_s
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(final, err) from err
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier()  # the checkpoint is complete for every process once rank 0 renamed it
        if main:
            atomic_write_text(self.root / "latest", final.name)
            self._prune(keep_name=final.name)
        return final

    @staticmethod
    def is_distributed(path: Path) -> bool:
        """Whether the checkpoint at `path` holds its model and optimizer as DCP shards (`save_distributed`)."""
        return (Path(path) / DCP_METADATA).is_file()

    def load_training(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                      model_name: str) -> dict[str, Any]:
        """Loads a checkpoint's model and optimizer into `model` (plain, DDP's module or sharded by FSDP) and
        `optimizer`, on any number of processes, and returns the rest of its training state.

        A DCP checkpoint is resharded to this run's processes by torch.distributed.checkpoint; a one-process
        checkpoint's weights are loaded whole (into each shard's part when sharded), as is its optimizer state.
        """
        from .sharding import is_sharded, load_full_optimizer_state

        state = self.load_state(path)
        if self.is_distributed(path):
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optimizer_state = get_state_dict(model, optimizer)
            loaded = {"model": model_state, "optimizer": optimizer_state}
            try:
                _dcp_load(loaded, path)
            except Exception as err:
                raise UserError(f"Checkpoint {path} does not fit this run's model and optimizer ({err}); resume "
                                f"it with the model it was trained with, or delete it to use an earlier one.") from err
            set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
            return state
        load_weights(model, path / WEIGHTS, model_name=model_name)
        if is_sharded(model):
            load_full_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        return state

    def candidates(self) -> list[Path]:
        """Checkpoint directories, newest step first.

        A step directory is complete once it has its name (it is renamed into place last), so the newest one
        is the latest checkpoint even if writing `latest` afterwards failed; `latest` is informational and
        never followed, so it cannot point outside the run.
        """
        return sorted((p for p in self.root.glob("step-*") if p.is_dir() and _STEP_NAME.fullmatch(p.name)),
                      reverse=True)

    def latest(self) -> Path | None:
        """The newest intact checkpoint (see `check`), noting on stderr any newer damaged one it skipped."""
        for path in self.candidates():
            problem = self.check(path)
            if problem is None:
                return path
            print(f"note: checkpoint {path} is damaged ({problem}); trying an earlier one.", file=sys.stderr)
        return None

    def check(self, path: Path) -> str | None:
        """None when every file of the checkpoint matches its manifest, else what is wrong."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            # checkpoints written before manifests existed: the two files must at least be there
            missing = [n for n in (WEIGHTS, TRAINING_STATE) if not (path / n).is_file()]
            return f"{missing[0]} is missing" if missing else None
        except (OSError, ValueError) as err:
            return f"its {MANIFEST} is unreadable: {err}"
        if not isinstance(manifest, dict) or not all(isinstance(v, list) and len(v) == 2 for v in manifest.values()):
            return f"its {MANIFEST} is not a map of file names to [size, checksum]"
        for name, recorded in manifest.items():
            file = path / name
            if not file.is_file() or "/" in name:
                return f"{name} is missing"
            if _digest(file) != recorded:
                return f"{name} does not match its recorded size and checksum"
        return None

    def discard_after(self, path: Path) -> list[Path]:
        """Deletes the checkpoints newer than `path` (the one a run resumes from, so they are damaged ones that
        `latest` skipped); the resumed run writes those steps again."""
        newer = [p for p in self.candidates() if p.name > path.name]
        for p in newer:
            shutil.rmtree(p, ignore_errors=True)
        return newer

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


def _to_bytes(value: Any) -> bytes:
    """`value` (tensors, lists, numbers) as bytes, for `distributed.all_gather` (which cannot pickle tensors' storages
    on every backend)."""
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def _digest(path: Path) -> list:
    """[size, sha256 hex] of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return [path.stat().st_size, h.hexdigest()]


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Deletes what interrupted writes left in a run directory (`.NAME.*.tmp` files, `.step-*` folders)."""
    run_dir = Path(run_dir)
    found = [*run_dir.rglob(".*.tmp"), *(run_dir / "checkpoints").glob(".step-*")]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


class RunDirLock:
    """Exclusive ownership of a run directory for one process's lifetime (an fcntl lock on `.lock`).

    The kernel drops the lock when the process dies, however it dies, so a killed run never blocks its
    directory; a second process that tries to train in the same directory gets one sentence instead.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(self.path, err) from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(f"Run directory {run_dir} is in use by another training process; wait for it to "
                            f"finish, or choose another train.run_name.") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def claim_new_run_dir(run_dir: Path) -> RunDirLock:
    """Creates `run_dir` atomically and locks it; a directory that already holds a run is an error.

    `mkdir` without exist_ok is the atomic test: of two trainings started with one name, one creates the
    directory. An existing directory is only taken over when it holds no run (no config.yaml) and nobody
    holds its lock, e.g. an empty folder made by hand.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(run_dir.parent, err) from err
    try:
        run_dir.mkdir()
    except FileExistsError:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} exists and is not a directory; choose another train.run_name.") from None
        lock = RunDirLock(run_dir)
        if (run_dir / CONFIG).exists():
            lock.release()
            raise UserError(f"Run directory {run_dir} already holds a run; choose another train.run_name or "
                            f"continue it with `polyattn train --resume {run_dir}`.") from None
        return lock
    except OSError as err:
        raise write_error(run_dir, err) from err
    return RunDirLock(run_dir)


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
