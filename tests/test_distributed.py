"""Distributed training with torchrun on this CPU (gloo): the result does not depend on the number of processes
(DDP or FSDP), a killed process stops the others within a bounded time, and checkpoints resume across world sizes.

Each test launches `polyattn train --nproc N` (torchrun) as a subprocess, with a tiny model and a few steps.
Tolerance: 1 and 2 processes differ only in the order of floating-point sums (the gradient all-reduce, the sharded
evaluation), so losses agree to a relative 1e-5 (measured: about 1e-7 on this CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# `make test` runs these in a pass of their own, after the rest, in one process: each starts 2-3 processes of its own,
# and inside the pytest-xdist pass the FSDP test's second rank aborted ("terminate called without an active
# exception", exit -6) in 2 of 2 full runs on the 2-core AMD EPYC, while it passed 12 of 12 times alone, under load,
# and with this file alone under xdist. The cause is not found.
pytestmark = pytest.mark.torchrun

SRC = Path(__file__).resolve().parents[1] / "src"
TOLERANCE = 1e-5
IMAGES = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
          "data.crop_padding=1", "model.drop_path_rate=0", "train.batch_size=64", "train.warmup_epochs=0"]
TEXT = ["data.source=shakespeare", "model.dim=32", "model.depth=1", "model.num_heads=2", "data.seq_len=32",
        "train.batch_size=8", "data.eval_tokens=2048", "data.eval_batch_size=16", "train.warmup_epochs=0"]
COMMON = ["train.progress=false", "train.log_every=1", "train.precision=fp32"]
KILL_WITHIN_S = 30
"""A killed process's peers exit within this many seconds (measured: under 3 s; gloo's connection to the dead
process closes at once, and a stalled one trips `train.collective_timeout_s`)."""


def _polyattn(*args: str, nproc: int = 1, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "polyattn", "train", *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(run: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r["kind"] == "train"]


def _test_metrics(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["test"]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOLERANCE * max(abs(x), abs(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("recipe, settings", [
    ("default", [*IMAGES, "train.accumulation_steps=2"]),
    ("bert_shakespeare", TEXT),  # each step's count (its masked tokens) varies
    ("default", [*IMAGES, "model.depth=2", "model.reversible=true"]),  # blocks entered through their branches
], ids=["classification", "masked_lm", "reversible"])
def test_one_and_two_processes_give_the_same_run(recipe, settings, tmp_path):
    args = [recipe, *settings, *COMMON, "train.max_steps=4", f"train.out_dir={tmp_path}"]
    _polyattn(*args, "train.run_name=one")
    out = _polyattn(*args, "train.run_name=two", nproc=2)
    assert "2 processes (gloo)" in out and out.count("summary") == 1  # rank 0 alone prints and writes
    assert _close(_losses(tmp_path / "one"), _losses(tmp_path / "two"))
    one, two = _test_metrics(tmp_path / "one"), _test_metrics(tmp_path / "two")  # sharded, reduced evaluation
    assert one.keys() == two.keys() and _close(list(one.values()), list(two.values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of a torchrun worker of `launcher` by its RANK (read from /proc)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and pid != launcher.pid and _descends(pid, launcher.pid):
            return pid
    raise AssertionError(f"no worker of rank {rank} found")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the checkpoint lives until two later ones replace it, a few steps on an idle machine
    assert path.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else f"{path} never appeared"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_process_stops_the_others_and_checkpoints_resume_across_world_sizes(tmp_path):
    args = ["default", *IMAGES, *COMMON, "train.epochs=2", "train.checkpoint_every=2", f"train.out_dir={tmp_path}"]
    _polyattn(*args, "train.run_name=ref", "train.max_steps=8")
    reference = _losses(tmp_path / "ref")

    # 2 processes, one killed with SIGKILL after the checkpoint of step 4: the other stops with one sentence
    run = tmp_path / "killed"
    proc = _polyattn(*args, "train.run_name=killed", nproc=2, wait=False)
    _wait_for(run / "checkpoints" / "step-00000004", proc)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    killed_at = time.time()
    out, _ = proc.communicate(timeout=120)
    assert time.time() - killed_at < KILL_WITHIN_S
    assert proc.returncode != 0
    assert "error: Process 0 of 2 lost the other processes" in out and "the last complete checkpoint is" in out
    # written by 2 processes, resumed by 1
    _polyattn("--resume", str(run), "train.max_steps=8")
    assert _close(_losses(run), reference)

    # written by 1 process, resumed by 2: a one-process run stopped after its checkpoint of step 4. Made by
    # truncating a finished run, since a signal could come too late for a run this fast (SIGTERM's own handling is
    # tested in test_reliability); checkpoint_every=2 keeps the last two, so step 4 stays when it stops at 4
    run = tmp_path / "stopped"
    _polyattn(*args, "train.run_name=stopped", "train.max_steps=4")
    _stopped_at(run, 4)
    _polyattn("--resume", str(run), "train.max_steps=8", nproc=2)
    assert _close(_losses(run), reference)
    assert _close(list(_test_metrics(run).values()), list(_test_metrics(tmp_path / "ref").values()))


def _stopped_at(run: Path, step: int) -> None:
    """Leaves `run` as a run that stopped after its checkpoint of `step` (as a killed one does): its final files
    and any later checkpoint go."""
    for name in ("summary.json", "model.safetensors"):
        (run / name).unlink()
    for later in (p for p in (run / "checkpoints").glob("step-*") if p.name > f"step-{step:08d}"):
        shutil.rmtree(later)
    assert (run / "checkpoints" / f"step-{step:08d}" / "training_state.pt").is_file()


def test_fsdp_gives_the_same_run_and_its_checkpoints_reshard_to_any_number_of_processes(tmp_path):
    """FSDP (each of the 2 blocks and the root sharded over 2 processes, with activation checkpointing and 2
    micro-batches) trains as one process does; its DCP checkpoint, written by 2 processes, resumes on 1, and a
    one-process checkpoint resumes sharded on 2, each continuing the uninterrupted run's loss curve."""
    import torch

    from polyattn.train.checkpoint import CheckpointDir, load_checkpoint_weights
    from polyattn.train.loop import load_run

    args = ["default", *IMAGES, "model.depth=2", "train.accumulation_steps=2", *COMMON, "train.fsdp=true",
            "train.checkpoint_every=4", f"train.out_dir={tmp_path}"]
    out = _polyattn(*args, "train.run_name=ref", "train.max_steps=8")
    assert "alone, this process trains it whole" in out  # train.fsdp on one process: a note, the plain run
    reference, grad_norms = _losses(tmp_path / "ref"), _losses(tmp_path / "ref", "grad_norm")

    # written sharded by 2 processes (one DCP shard file each), resumed by 1
    sharded = tmp_path / "sharded"
    _polyattn(*args, "train.run_name=sharded", "train.max_steps=4", "train.activation_checkpointing=true", nproc=2)
    assert _close(_losses(sharded), reference[:4])
    assert _close(_losses(sharded, "grad_norm"), grad_norms[:4])  # the norm of the shards' gradients (clipped > 1)
    checkpoint = sharded / "checkpoints" / "step-00000004"
    assert {p.name for p in checkpoint.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    final = load_run(sharded).model  # the final weights: one plain file, loaded without torch.distributed
    resharded = load_run(sharded).model
    load_checkpoint_weights(resharded, checkpoint, model_name="vit_nano")  # the 2 shards, read by one process
    for (name, a), b in zip(final.state_dict().items(), resharded.state_dict().values()):
        assert torch.equal(a, b), name  # the same step's weights, bit for bit
    _stopped_at(sharded, 4)
    assert CheckpointDir(sharded).latest() == checkpoint
    _polyattn("--resume", str(sharded), "train.max_steps=8")
    assert _close(_losses(sharded), reference)

    # written by 1 process (the reference's checkpoint of step 4), resumed sharded by 2
    whole = tmp_path / "whole"
    shutil.copytree(tmp_path / "ref", whole)
    _stopped_at(whole, 4)
    _polyattn("--resume", str(whole), "train.max_steps=8", nproc=2)
    assert _close(_losses(whole), reference)
    assert _close(list(_test_metrics(whole).values()), list(_test_metrics(tmp_path / "ref").values()))


def test_a_bad_key_under_nproc_is_one_sentence_before_any_process_starts(monkeypatch, capsys):
    from polyattn.cli import main

    launched = []
    monkeypatch.setattr(subprocess, "call", lambda command, **_: launched.append(command) or 0)
    assert main(["train", "--nproc", "2", "default", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "train.nope" in err and not launched
    assert main(["train", "--nproc", "2", "default", "train.max_steps=1"]) == 0 and len(launched) == 1
    assert launched[0][-3:] == ["train", "default", "train.max_steps=1"]
