"""Fault injection: bad inputs, exploding runs, signals, damaged checkpoints and caches, full disks.

Every case of `reliability_cases.CASES` (which the README's Reliability table is rendered from) has one check
here, and nothing is lost: after each fault the last checkpoint is one a resumed run can use.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyattn.cli import main
from polyattn.errors import Interrupted, UserError
from polyattn.train.config import build_config
from polyattn.train.loop import load_run_config, train
from reliability_cases import CASES, README, readme_with_table

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
        "data.crop_padding=1", "train.batch_size=64", "train.progress=false", "train.log_every=1",
        "train.precision=fp32", "train.warmup_epochs=0"]

CHECKS = {}


def check(case_id):
    def register(fn):
        CHECKS[case_id] = fn
        return fn
    return register


def tiny(tmp_path, *extra):
    return build_config("default", [*TINY, f"train.out_dir={tmp_path / 'runs'}", *extra])


def _loss_class():
    from polyattn.tasks import image_classification

    return image_classification.ImageClassificationJob


def _wrap_loss(monkeypatch, after):
    """Wraps the job's loss: `after(call_index, model, loss)` may change the gradients or send a signal."""
    job_class = _loss_class()
    original = job_class.loss
    calls = [0]

    def loss(self, model, batch, inputs):
        value, n = original(self, model, batch, inputs)
        value = after(calls[0], model, value)
        calls[0] += 1
        return value, n

    monkeypatch.setattr(job_class, "loss", loss)


def _checkpoint_names(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def test_every_case_has_a_check_and_every_check_a_case():
    assert sorted(CHECKS) == sorted(c.id for c in CASES if not c.argv)
    assert len({c.id for c in CASES}) == len(CASES)


def test_readme_table_matches_the_cases():
    text = README.read_text()
    assert text == readme_with_table(text), "README's Reliability table is stale: run python tests/reliability_cases.py"


@pytest.mark.parametrize("case", [c for c in CASES if c.argv], ids=lambda c: c.id)
def test_bad_value_is_one_sentence_exit_2_and_writes_nothing(case, tmp_path, cache_dir, capsys):
    runs = tmp_path / "runs"
    assert main([*case.argv, f"train.out_dir={runs}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    assert case.message in err
    assert not runs.exists(), "a refused start left files behind"


@pytest.mark.parametrize("case", [c for c in CASES if not c.argv], ids=lambda c: c.id)
def test_fault(case, tmp_path, cache_dir, capsys, monkeypatch):
    CHECKS[case.id](tmp_path, capsys, monkeypatch)


@check("nan-loss")
def _(tmp_path, capsys, monkeypatch):
    _wrap_loss(monkeypatch, lambda i, model, loss: loss * float("nan"))
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row .* no checkpoint was written"):
        train(tiny(tmp_path, "train.run_name=n"))
    assert _checkpoint_names(tmp_path / "runs" / "n") == []
    captured = capsys.readouterr()
    assert "step skipped (1 of at most 3 in a row)" in captured.out + captured.err


@check("exploding-lr")
def _(tmp_path, capsys, monkeypatch):
    from polyattn.train import loop

    normal = loop.CosineSchedule.__call__
    monkeypatch.setattr(loop.CosineSchedule, "__call__", lambda self, step: 1e30 if step >= 4 else normal(self, step))
    with pytest.raises(UserError, match=r"the last good checkpoint is .*step-00000004") as info:
        train(tiny(tmp_path, "train.run_name=e", "train.checkpoint_every=2"))
    assert "stopped at step 8" in str(info.value)
    run = tmp_path / "runs" / "e"
    from polyattn.train.loop import load_run_model

    model, config = load_run_model(run)  # its latest checkpoint: the last good one
    assert all(torch.isfinite(p).all() for p in model.parameters())
    from polyattn.tasks import build_job

    job = build_job(config, device=torch.device("cpu"))
    metrics = job.evaluate(model, "test", autocast=lambda: torch.autocast("cpu", enabled=False))
    assert math.isfinite(metrics["loss"])


@check("nan-gradient")
def _(tmp_path, capsys, monkeypatch):
    def poison(i, model, loss):
        if i == 2:  # the loss stays finite, its gradient does not
            loss = loss.clone()
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    _wrap_loss(monkeypatch, poison)
    summary = train(tiny(tmp_path, "train.run_name=g", "train.max_steps=5"))
    assert summary["steps"] == 5 and summary["bad_steps"] == 1
    assert math.isfinite(summary["test"]["loss"])


@check("sigterm")
def _(tmp_path, capsys, monkeypatch):
    ref = train(tiny(tmp_path, "train.run_name=ref", "train.max_steps=8"))
    handler = signal.getsignal(signal.SIGTERM)

    def term(i, model, loss):
        if i == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    with monkeypatch.context() as m:
        _wrap_loss(m, term)
        with pytest.raises(Interrupted, match="Training stopped by SIGTERM at step 5") as info:
            train(tiny(tmp_path, "train.run_name=t", "train.max_steps=8"))
    assert info.value.exit_code == 143
    run = tmp_path / "runs" / "t"
    assert "step-00000005" in _checkpoint_names(run)
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone again
    resumed = train(load_run_config(run), resume_dir=run)
    assert "resuming" in capsys.readouterr().err
    assert resumed["test"] == ref["test"]

    # the command line: a real SIGTERM once the first checkpoint exists; exit 143 and one sentence
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "polyattn", "train", "default", *TINY, "train.epochs=1000",
                             f"train.out_dir={tmp_path / 'runs'}", "train.run_name=cli", "train.checkpoint_every=2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "runs" / "cli" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Training stopped by SIGTERM at step ") and "polyattn train --resume" in last
    step = int(last.split("at step ")[1].split(";")[0])
    assert (tmp_path / "runs" / "cli" / "checkpoints" / f"step-{step:08d}").is_dir()


@check("short-run")
def _(tmp_path, capsys, monkeypatch):
    train(tiny(tmp_path, "train.run_name=s", "train.max_steps=3"))
    assert _checkpoint_names(tmp_path / "runs" / "s") == ["step-00000003"]
    # by time: a tiny interval checkpoints at (the step after) every boundary
    train(tiny(tmp_path, "train.run_name=s2", "train.max_steps=4", "train.checkpoint_every_s=1e-9"))
    names = _checkpoint_names(tmp_path / "runs" / "s2")
    assert names == ["step-00000003", "step-00000004"]  # two kept (older ones pruned)


def _interrupted_run(tmp_path, name="r"):
    """A run stopped after 6 steps with checkpoints at steps 3 and 6 and no final weights (as if killed)."""
    train(tiny(tmp_path, f"train.run_name={name}", "train.max_steps=6", "train.checkpoint_every=3"))
    run = tmp_path / "runs" / name
    for file in ("summary.json", "model.safetensors"):
        (run / file).unlink()
    assert _checkpoint_names(run) == ["step-00000003", "step-00000006"]
    return run


def _resume(run, *extra, capsys=None):
    code = main(["train", "--resume", str(run), "train.max_steps=7", *extra])
    return code, (capsys.readouterr().err if capsys is not None else "")


@check("corrupt-latest")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    weights = run / "checkpoints" / "step-00000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside a tensor: the file still parses
    weights.write_bytes(bytes(data))
    code, err = _resume(run, capsys=capsys)
    assert code == 0
    assert "step-00000006 is damaged (model.safetensors does not match" in err
    assert "at step 3/" in err and "from step-00000003" in err
    assert "removed the damaged checkpoint" in err
    from polyattn.train.checkpoint import CheckpointDir

    checkpoints = CheckpointDir(run)
    assert _checkpoint_names(run) == ["step-00000006", "step-00000007"]  # step 6 written again, intact
    assert all(checkpoints.check(p) is None for p in checkpoints.candidates())


@check("deleted-latest")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")
    code, err = _resume(run, capsys=capsys)
    assert code == 0 and "at step 3/" in err


@check("all-damaged")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    for state in (run / "checkpoints").glob("step-*/training_state.pt"):
        state.write_bytes(state.read_bytes()[:50])
    code, err = _resume(run, capsys=capsys)
    assert code == 2 and "Every checkpoint in" in err and "is damaged" in err


@check("damaged-metrics")
def _(tmp_path, capsys, monkeypatch):
    from polyattn.train.run_log import read_metrics

    run = _interrupted_run(tmp_path)
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]  # one line damaged in the middle
    path.write_text("\n".join(lines) + "\n{\"kind\": \"train\", \"ste")  # and one cut short at the end
    records = read_metrics(run)
    assert len(records) == len(lines) - 1 and records[-1]["step"] == 6
    assert "skipped 2 unreadable line(s)" in capsys.readouterr().err


@check("pointer-escape")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "checkpoints" / "latest").write_text("../../../outside")
    from polyattn.train.checkpoint import CheckpointDir

    assert CheckpointDir(run).latest() == run / "checkpoints" / "step-00000006"


@check("stale-temporaries")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    stale = [run / ".config.yaml.abc.tmp", run / "checkpoints" / ".step-00000009.xyz",
             run / "checkpoints" / "step-00000006" / ".model.safetensors.q.tmp"]
    stale[0].write_text("half")
    stale[1].mkdir()
    stale[2].write_bytes(b"half")
    code, err = _resume(run, capsys=capsys)
    assert code == 0 and "left by an interrupted write" in err
    assert not any(p.exists() for p in stale)


@check("enospc-checkpoint")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    from polyattn.train import checkpoint

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a partial file exists when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code = main(["train", "--resume", str(run), "train.max_steps=7"])
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot write {run / 'checkpoints' / 'step-00000007'}: the disk is full" in err
    assert (run / "checkpoints" / "latest").read_text() == "step-00000006"
    assert not list(run.rglob(".*.tmp")) and not list((run / "checkpoints").glob(".step-*"))
    monkeypatch.undo()
    assert _resume(run)[0] == 0  # nothing was lost: the run continues from step 6


@check("enospc-log")
def _(tmp_path, capsys, monkeypatch):
    from polyattn.train import run_log

    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_log, "open", full_disk_open, raising=False)
    with pytest.raises(UserError, match=r"Cannot write .*metrics.jsonl: the disk is full"):
        train(tiny(tmp_path, "train.run_name=l", "train.max_steps=2"))


@check("enospc-elsewhere")
def _(tmp_path, capsys, monkeypatch):
    from polyattn.train import loop

    def full_disk(run_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "plots" / "x.png"))

    monkeypatch.setattr(loop, "write_plots", full_disk)
    assert main(["train", "default", *TINY, f"train.out_dir={tmp_path / 'runs'}", "train.max_steps=1"]) == 2
    header, error = capsys.readouterr().err.splitlines()  # the run's first line, then one sentence
    assert header.startswith("training ") and error.startswith("error: Cannot write ") and "x.png: the disk is " \
        "full" in error


@check("unwritable-out-dir")
def _(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the runs folder should go")
    assert main(["train", "default", *TINY, f"train.out_dir={blocker}/runs", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot write") and str(blocker) in err and err.count("\n") == 1


@check("wrong-shape-weights")
def _(tmp_path, capsys, monkeypatch):
    train(tiny(tmp_path, "train.run_name=w", "train.max_steps=2"))
    capsys.readouterr()  # the training's own first line
    run = tmp_path / "runs" / "w"
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("num_classes: 10", "num_classes: 7"))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"'head\.(weight|bias)' has shape \[10.*\] but the config builds \[7", err)
    assert err.count("\n") == 1
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "train.max_steps=3"]) == 2
    assert re.search(r"has shape \[10.*\] but the config builds \[7", capsys.readouterr().err)


@check("concurrent-runs")
def _(tmp_path, capsys, monkeypatch):
    from polyattn.train.checkpoint import RunDirLock, claim_new_run_dir

    run = tmp_path / "runs" / "c"
    first = claim_new_run_dir(run)  # another training that has just created the directory
    try:
        with pytest.raises(UserError, match="is in use by another training process"):
            train(tiny(tmp_path, "train.run_name=c", "train.max_steps=1"))
    finally:
        first.release()
    run2 = _interrupted_run(tmp_path, "c2")
    holder = RunDirLock(run2)  # a run that is still training
    try:
        code, err = _resume(run2, capsys=capsys)
        assert code == 2 and "is in use by another training process" in err
    finally:
        holder.release()
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny(tmp_path, "train.run_name=c2", "train.max_steps=1"))

    # two processes started together with one run name: one trains, the other is refused in one sentence
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "polyattn", "train", "default", *TINY, f"train.out_dir={tmp_path / 'runs'}",
            "train.run_name=both", "train.max_steps=3"]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    (refused,) = [err for p, (_, err) in zip(procs, results) if p.returncode == 2]
    assert refused.startswith("error: Run directory") and ("in use by another" in refused
                                                           or "already holds a run" in refused)
    summary = json.loads((tmp_path / "runs" / "both" / "summary.json").read_text())
    assert summary["steps"] == 3


@check("stub-run-dir")
def _(tmp_path, capsys, monkeypatch):
    stub = tmp_path / "runs" / "stub"
    (stub / "tensorboard").mkdir(parents=True)
    summary = train(tiny(tmp_path, "train.run_name=stub", "train.max_steps=1"))
    assert summary["steps"] == 1 and (stub / "config.yaml").is_file()


@check("resume-changes")
def _(tmp_path, capsys, monkeypatch):
    run = _interrupted_run(tmp_path)
    original = (run / "config.yaml").read_text()
    code, err = _resume(run, "train.seed=1", capsys=capsys)
    assert code == 2 and "train.seed 0 → 1 would not reproduce the run" in err and "--force" in err
    code, err = _resume(run, "train.batch_size=32", capsys=capsys)
    assert code == 2 and "train.batch_size 64 → 32" in err
    assert (run / "config.yaml").read_text() == original
    code, err = _resume(run, "train.seed=1", "--force", capsys=capsys)
    assert code == 0 and "config.original.yaml" in err
    assert (run / "config.original.yaml").read_text() == original
    assert "seed: 1" in (run / "config.yaml").read_text()


@check("endless-text")
def _(tmp_path, capsys, monkeypatch):
    import gzip

    from polyattn.data import text

    growing = tmp_path / "growing.txt"
    growing.write_text("hello world\n")
    source = text.resolve_text_source(str(growing))
    with open(growing, "a") as f:  # the file keeps growing after the source was resolved
        f.write("more text that must not be read\n" * 100)
    assert "".join(source.text()) == "hello world\n"

    bomb = tmp_path / "bomb.txt.gz"
    with gzip.open(bomb, "wt") as f:
        f.write("a" * 10_000)
    monkeypatch.setattr(text, "MAX_TEXT_BYTES", 1000)
    with pytest.raises(UserError, match="decompresses to more than"):
        "".join(text.resolve_text_source(str(bomb)).text())


@check("fifo-images")
def _(tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "images.tar"
    os.mkfifo(fifo)
    assert main(["train", "default", f"data.source={fifo}", f"train.out_dir={tmp_path / 'runs'}"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@check("huge-image")
def _(tmp_path, capsys, monkeypatch):
    import tarfile

    from polyattn.data import images

    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    (folder / "big.png").write_bytes(b"\0" * 5000)
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 4096)
    for source in (tmp_path / "imgs", tmp_path / "imgs.tar"):
        with pytest.raises(UserError, match=r"big\.png' is 0 MiB, more than the 0 MiB"):
            images.load_image_split(str(source), "train", cache_dir=tmp_path / "cache")


def _token_cache(tmp_path):
    from polyattn.data.text import token_file_for_source
    from polyattn.data.tokenizers import ByteTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50)
    return lambda: token_file_for_source(str(corpus), ByteTokenizer(), cache_dir=tmp_path / "cache")


@check("corrupt-token-cache")
def _(tmp_path, capsys, monkeypatch):
    import numpy as np

    load = _token_cache(tmp_path)
    first = np.array(load().tokens)
    (binary,) = (tmp_path / "cache" / "text").glob("*.bin")
    data = bytearray(binary.read_bytes())
    data[7] ^= 0x20  # same size, one flipped bit
    binary.write_bytes(bytes(data))
    assert np.array_equal(np.array(load().tokens), first)  # rebuilt, not read as it was
    (docs,) = (tmp_path / "cache" / "text").glob("*.docs.npy")
    np.save(docs, np.asarray([0, 5], dtype=np.int64))  # offsets that do not end at the token count
    assert np.array_equal(np.array(load().tokens), first)


@check("enospc-token-cache")
def _(tmp_path, capsys, monkeypatch):
    from polyattn.data import text

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(text, "atomic_write", full_disk)
    monkeypatch.setattr(text.tempfile, "mkdtemp", lambda **kw: pytest.fail("fell back to a temporary directory"))
    with pytest.raises(UserError, match=r"Cannot write the token cache .*\.bin \(No space left on device\)"):
        _token_cache(tmp_path)()


@check("op-inputs")
def _(tmp_path, capsys, monkeypatch):
    code = """
import torch
from polyattn.ops.attention import attention
from polyattn.ops.lightnet import lightnet_attn
from polyattn.ops.decay_scan import decay_attn
q = torch.randn(2, 5, 2, 4)
for call in (lambda: attention(q.long(), q, q), lambda: lightnet_attn(q[0], q[0], q[0], causal=True),
             lambda: decay_attn(q, q, q[:, :3], -q.abs()),
             lambda: lightnet_attn(q, q, q, causal=True, mask=torch.ones(2, 4, dtype=torch.bool))):
    try:
        call()
    except ValueError as err:
        print("ValueError:", err)
o, state = lightnet_attn(q[:, :0], q[:, :0], q[:, :0], causal=True, output_final_state=True)
print("empty", tuple(o.shape), tuple(state.S.shape))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["ValueError"] * 4, out.stdout
    assert "must be a floating-point tensor" in lines[0] and "(4-D)" in lines[1]
    assert "must share [B, T, H]" in lines[2] and "mask must be [B, T]" in lines[3]
    assert lines[4] == "empty (2, 0, 2, 4) (2, 2, 4, 4)"

