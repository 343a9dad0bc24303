"""End-to-end: the training engine, run directories, exact resume, evaluation and bad input."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyattn.cli import main
from polyattn.errors import UserError
from polyattn.train.config import RunConfig, build_config
from polyattn.train.loop import train
from polyattn.train.run_log import read_metrics

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
        "data.crop_padding=1", "train.batch_size=64", "train.progress=false", "train.log_every=5"]


def tiny_config(tmp_path, *extra):
    return build_config("default", [*TINY, f"train.out_dir={tmp_path}", *extra])


def test_run_directory_describes_itself(tmp_path, cache_dir, capsys):
    summary = train(tiny_config(tmp_path, "train.epochs=2", "train.run_name=r"))
    run = tmp_path / "r"
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "summary.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("loss.png", "top1.png", "lr.png", "samples_per_s.png", "overview.png"):
        assert (run / "plots" / name).is_file(), name
    assert not (run / "plots" / "count.png").exists()
    assert summary["test"]["top1"] > 0.3  # 2 epochs of a tiny model: better than chance (0.1)
    assert {"top1", "top5", "ece", "loss"} <= set(summary["test"])
    assert "summary" in capsys.readouterr().out

    # eval needs nothing but the directory and reproduces the final test metrics
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{summary['test']['top1']:.4f}" in out

    # settings changed for one evaluation: a smaller test split; a bad key is one sentence
    from polyattn.train.loop import evaluate_run

    assert 0 < evaluate_run(run, overrides=["data.test_fraction=0.1"])["count"] < summary["test"]["count"]
    assert main(["eval", str(run), "data.test_fraction=0.1"]) == 0
    assert main(["eval", str(run), "data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    # test-time flips: only for a run that trained on mirror images (the digits do not)
    assert main(["eval", str(run), "task.eval_flip=true"]) == 2
    assert "data.hflip is false" in capsys.readouterr().err
    flipped = evaluate_run(run, overrides=["task.eval_flip=true", "data.hflip=true"])
    assert flipped["count"] == summary["test"]["count"] and flipped["loss"] != summary["test"]["loss"]


def test_gradient_accumulation_matches_one_batch(tmp_path, cache_dir):
    one = train(tiny_config(tmp_path, "train.max_steps=3", "train.run_name=a", "train.precision=fp32"))
    two = train(tiny_config(tmp_path, "train.max_steps=3", "train.run_name=b", "train.precision=fp32",
                            "train.accumulation_steps=4"))
    assert one["test"]["loss"] == pytest.approx(two["test"]["loss"], rel=1e-4)


def test_nan_loss_stops_with_one_clear_sentence(tmp_path, cache_dir, monkeypatch):
    from polyattn.tasks import image_classification

    finite_loss = image_classification.ImageClassificationJob.loss

    def nan_loss(self, model, batch, inputs):
        loss, n = finite_loss(self, model, batch, inputs)
        return loss * float("nan"), n

    monkeypatch.setattr(image_classification.ImageClassificationJob, "loss", nan_loss)
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row .* no checkpoint was written"):
        train(tiny_config(tmp_path, "train.run_name=n"))


def _polyattn(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "polyattn", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _comparable(records):
    """Metrics records without wall-clock values."""
    return [{k: v for k, v in r.items() if k not in ("samples_per_s",)} for r in records]


@pytest.mark.slow
def test_kill_9_and_resume_reaches_the_same_metrics(tmp_path, cache_dir):
    args = ["train", "default", *TINY, f"train.out_dir={tmp_path}", "train.epochs=12", "model.embed_dim=64",
            "train.checkpoint_every=7", "model.drop_path_rate=0.1"]
    # uninterrupted reference
    ref = _polyattn(*args, "train.run_name=ref")
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out

    # the same run, killed with SIGKILL once a mid-epoch checkpoint exists, then resumed
    run = tmp_path / "killed"
    proc = _polyattn(*args, "train.run_name=killed")
    deadline = time.time() + 900  # generous: a loaded CI machine may start slowly
    latest = run / "checkpoints" / "latest"
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and int(latest.read_text().split("-")[1]) >= 30:
            break
        time.sleep(0.01)
    assert latest.is_file(), "no checkpoint was written before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"

    resumed = _polyattn("train", "--resume", str(run))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    assert "resuming" in out

    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"] == ref_summary["test"]
    assert summary["steps"] == ref_summary["steps"]
    assert _comparable(read_metrics(run)) == _comparable(read_metrics(tmp_path / "ref"))


@pytest.mark.parametrize("argv, message", [
    (["train", "nope"], "Unknown recipe 'nope'"),
    (["train", "default", "train.lrr=1"], "Did you mean 'train.lr'?"),
    (["train", "default", "model=vit_tinyy"], "Unknown model 'vit_tinyy'"),
    (["train", "default", "data.source=/does/not/exist"], "/does/not/exist"),
    (["train", "default", "model.patch_size=3"], "not divisible by the patch size"),
    (["eval", "/no/such/run"], "does not exist"),
])
def test_bad_input_is_one_sentence_and_exit_2(argv, message, tmp_path, cache_dir, capsys):
    runs = tmp_path / "runs"
    code = main([*argv, f"train.out_dir={runs}"] if argv[0] == "train" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not runs.exists(), "a failed start left files behind"


def test_corrupted_or_foreign_weights_are_refused(tmp_path, cache_dir, capsys):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=a"))
    train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=b", "model.depth=2"))
    a, b = tmp_path / "a", tmp_path / "b"

    # weights of a deeper model copied into run a
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    assert main(["eval", str(a)]) == 2
    assert "do not fit model 'vit_nano'" in capsys.readouterr().err

    # a truncated file
    data = (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", str(b)]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_resume_refuses_a_finished_run_and_model_changes(tmp_path, cache_dir, capsys):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.epochs=1", "train.run_name=done"))
    assert main(["train", "--resume", str(tmp_path / "done")]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "done"), "model.depth=5"]) == 2
    assert "cannot change its model" in capsys.readouterr().err


def test_models_command_lists_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny" in out and "5.72M" in out


def test_help_on_every_command(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["models", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "key=value" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "polyattn", "models", "--task", "classification"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "vit_base" in out.stdout


def test_recipe_files_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for recipe in root.glob("*.yaml"):
        build_config(str(recipe), [])


def test_soft_mask_schedule_shapes():
    from polyattn.train.schedules import InputSchedule

    constant = InputSchedule("constant", until=0.2)
    assert [constant.at(s, total_steps=100) for s in (0, 19, 20, 99)] == [1.0, 1.0, 0.0, 0.0]
    linear = InputSchedule("linear", until=0.2)
    values = [linear.at(s, 100) for s in range(25)]
    assert values[0] == 1.0 and values[19] == 0.0 and values[20:] == [0.0] * 5
    assert all(a > b for a, b in itertools.pairwise(values[:20]))  # strictly decreasing to the endpoint 0
    assert InputSchedule("linear", until=0.0).at(0, 100) == 0.0
    rising = InputSchedule("linear", start=0.5, end=2.0, until=0.5)  # any input, either direction
    assert rising.at(0, 10) == 0.5 and rising.at(4, 10) == 2.0 and rising.at(9, 10) == 2.0


def test_soft_mask_needs_a_model_that_takes_it(tmp_path, cache_dir):
    with pytest.raises(UserError, match="soft_mask_a"):
        train(tiny_config(tmp_path, "schedules.soft_mask_a.until=0.5", "train.run_name=s"))
    assert not (tmp_path / "s").exists()


def test_the_old_soft_mask_keys_still_load_with_a_note(capsys):
    config = build_config("default", ["model=illama_nano", "train.soft_mask=constant", "train.soft_mask_cutoff=0.3",
                                      "train.soft_mask_a0=0.5"])
    schedule = config.schedules["soft_mask_a"]
    assert (schedule.shape, schedule.until, schedule.start, schedule.end) == ("constant", 0.3, 0.5, 0.0)
    err = capsys.readouterr().err
    assert "note: train.soft_mask is deprecated; write schedules.soft_mask_a.shape=constant instead." in err
    # a run directory of the old version recorded the keys switched off: read as no schedule, silently
    old = config.to_dict()
    del old["schedules"]
    old["train"].update(soft_mask="none", soft_mask_cutoff=0.0, soft_mask_a0=1.0)
    assert RunConfig.from_dict(old, origin="old config.yaml").schedules == {}
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(tmp_path, cache_dir, capsys):
    train(tiny_config(tmp_path, "train.compile=true", "train.max_steps=2", "train.epochs=1", "train.run_name=c"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith("_orig_mod") for k in f.keys())  # noqa: SIM118
    assert main(["eval", str(tmp_path / "c")]) == 0


def test_weight_ema_follows_the_warmed_up_rule():
    from polyattn.train.ema import WeightEma, ema_decay_at

    model = torch.nn.Linear(3, 2)
    ema = WeightEma(model, 0.9)
    expected = model.weight.detach().clone()
    for i in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update_parameters(model)
        d = 0.0 if i == 0 else ema_decay_at(0.9, i)  # the first update copies the weights
        expected = d * expected + (1 - d) * model.weight.detach()
    torch.testing.assert_close(ema.module.weight, expected)
    assert ema.num_updates == 5 and not ema.module.weight.requires_grad


def test_ema_weights_are_saved_evaluated_and_resumed_exactly(tmp_path, cache_dir, capsys):
    from polyattn.train.checkpoint import load_weights
    from polyattn.train.loop import load_run_config, load_run_model

    extra = ["train.epochs=2", "train.ema_decay=0.9", "train.precision=fp32"]
    ref = train(tiny_config(tmp_path, *extra, "train.run_name=ref"))
    assert ref["weights"] == "ema" and (tmp_path / "ref" / "ema.safetensors").is_file()
    steps_per_epoch = ref["steps"] // 2

    # stop after the first epoch, forget that the run ended, and resume it
    train(tiny_config(tmp_path, *extra, "train.run_name=cut", f"train.max_steps={steps_per_epoch}"))
    for name in ("summary.json", "model.safetensors", "ema.safetensors"):
        (tmp_path / "cut" / name).unlink()
    config = load_run_config(tmp_path / "cut")
    config.train.max_steps = None
    resumed = train(config, resume_dir=tmp_path / "cut")
    assert resumed["test"] == ref["test"]
    ema_ref, _ = load_run_model(tmp_path / "ref")
    ema_cut, _ = load_run_model(tmp_path / "cut")
    for a, b in zip(ema_ref.state_dict().values(), ema_cut.state_dict().values()):
        assert torch.equal(a, b)

    # eval uses the averaged weights unless told otherwise; they differ from the raw weights
    raw, _ = load_run_model(tmp_path / "ref", ema=False)
    assert not torch.equal(raw.head.weight, ema_ref.head.weight)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ref")]) == 0
    assert f"{ref['test']['top1']:.4f}" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "ref"), "--no-ema"]) == 0
    with pytest.raises(UserError, match="kept no averaged weights"):
        other = train(tiny_config(tmp_path, "train.max_steps=1", "train.run_name=plain"))
        assert other["weights"] == "model"
        load_run_model(tmp_path / "plain", ema=True)
    load_weights(raw, tmp_path / "ref" / "ema.safetensors", model_name="vit_nano")  # same architecture


def test_time_budget_stops_training_and_ends_the_schedule_on_time(tmp_path, cache_dir, capsys):
    summary = train(tiny_config(tmp_path, "train.epochs=1000", "train.time_budget_s=1.5", "train.log_every=1",
                                "train.warmup_epochs=0", "train.run_name=t", "train.progress=true"))
    assert 1.5 <= summary["train_time_s"] < 5.0 and summary["epochs"] < 1000
    assert summary["time_budget_s"] == 1.5
    # the bar counts down the budget, not an ETA for the 1,000 epochs the run will never reach
    bar = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training:")][-1]
    assert "of the time budget left" in bar and "<" not in bar
    lrs = [r["lr"] for r in read_metrics(tmp_path / "t") if r["kind"] == "train"]
    lr = build_config("default", []).train.lr
    # the cosine schedule runs on the budget's share of training: it starts at lr and ends near min_lr
    assert lrs[0] == pytest.approx(lr, rel=0.05) and lrs[-1] < 0.05 * lr
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_training_length_in_steps_need_not_be_whole_epochs(tmp_path, cache_dir):
    summary = train(tiny_config(tmp_path, "train.steps=7", "train.log_every=1", "train.run_name=s"))
    assert summary["steps"] == 7
    lrs = [r["lr"] for r in read_metrics(tmp_path / "s") if r["kind"] == "train"]
    assert len(lrs) == 7 and lrs[-1] < 0.1 * lrs[0] + 1e-4  # the cosine schedule spans the 7 steps


def test_activation_checkpointing_changes_memory_not_results(tmp_path, cache_dir):
    from polyattn.train.sharding import checkpoint_blocks

    settings = ("train.max_steps=3", "train.precision=fp32", "model.depth=2", "model.drop_path_rate=0.1")
    plain = train(tiny_config(tmp_path, *settings, "train.run_name=plain"))
    recomputed = train(tiny_config(tmp_path, *settings, "train.run_name=ckpt", "train.activation_checkpointing=true"))
    assert recomputed["test"] == pytest.approx(plain["test"], rel=1e-6)  # dropout draws the same on recompute
    from polyattn import create_model

    model = create_model("vit_nano", depth=2, embed_dim=32, num_heads=2, img_size=8, patch_size=4, num_classes=3)
    assert checkpoint_blocks(model) == 2
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_weight_ema_averages_batch_norm_statistics_with_the_parameters():
    from polyattn.train.ema import WeightEma, ema_decay_at

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = WeightEma(model, 0.9)
    expected = None
    for i in range(4):
        model.train()(torch.randn(8, 3, 6, 6) * (i + 1))  # new running statistics
        ema.update_parameters(model)
        d = 0.0 if i == 0 else ema_decay_at(0.9, i)
        current = model[1].running_var.clone()
        expected = current if expected is None else d * expected + (1 - d) * current
    torch.testing.assert_close(ema.module[1].running_var, expected)
    assert ema.module[1].num_batches_tracked.item() == 4
    assert not torch.equal(ema.module[1].running_var, torch.ones(4))
