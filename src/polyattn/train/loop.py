"""The training loop: one loop for every model and task.

The loop sees a model (an nn.Module) and a `TrainingJob` that supplies batches, the loss and the
evaluation; it owns the optimizer, schedule, precision, accumulation, clipping, checkpoints, logging and
exact resume. Resuming restores the weights, the optimizer moments, the RNG states (torch, numpy, python
and the job's augmentation generator) and the position in the epoch, so a resumed run reproduces the
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UserError
from ..hardware import Precision, autocast_for, device_name, environment, resolve_device, resolve_precision
from ..progress import note, progress_bar
from ..registry import get_entry
from .checkpoint import (
    CONFIG,
    EMA_WEIGHTS,
    WEIGHTS,
    CheckpointDir,
    atomic_write_text,
    load_weights,
    save_weights,
    set_rng_state,
)
from .checkpoint import rng_state as current_rng_state
from .config import RunConfig, apply_overrides, load_yaml, save_yaml
from .ema import WeightEma
from .optim import CosineSchedule, build_optimizer
from .run_log import RunLog, format_table, write_plots
from .schedules import SoftMaskSchedule


class TrainingJob(Protocol):
    """What a task supplies to the loop (see polyattn.tasks).

    Optional: `throughput_unit` (what `loss` counts, e.g. "tokens"; default "samples"),
    `save_to_run_dir(run_dir)` (files the run directory needs besides the weights, such as a tokenizer),
    `describe_data()` (one line on the data, for a command's first line), `final_split` (what the README calls
    the split of the final evaluation, default "test"; text jobs: "val") and `progress` (show evaluation bars).
    """

    inferred_model_args: dict[str, Any]
    """Model arguments that follow from the data (e.g. num_classes, img_size), used unless the user set them."""
    steps_per_epoch: int
    samples_per_step: int
    eval_split: str
    """The split evaluated during training ('val' or 'test')."""

    def batches(self, epoch: int, start_step: int): ...
    """Iterator over the optimizer-step batches of one epoch, starting at `start_step`."""

    def loss(self, model: nn.Module, batch: Any, *, accumulation_steps: int, autocast,
             forward_kwargs: dict[str, Any], backward=torch.Tensor.backward) -> tuple[torch.Tensor, int]:
        """Forward and backward over one optimizer-step batch (split into micro-batches), passing
        `forward_kwargs` (scheduled model inputs such as `soft_mask_a`) to the model and each micro-batch's loss
        to `backward` (the loop's, which scales it under float16); returns the mean loss (detached) and the
        number of samples."""
        ...

    def evaluate(self, model: nn.Module, split: str, *, autocast) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _training_precision(config: RunConfig, device: torch.device, *, resuming: bool) -> Precision:
    """The precision this run trains in. A resumed run keeps the precision it resolved when it started (its
    config's `environment`), so resuming on another machine stays exact; `train.precision=fp32` (or bf16) on the
    resume command changes it explicitly."""
    return run_precision(config, device) if resuming else resolve_precision(config.train.precision, device)


def run_precision(config: RunConfig, device: torch.device) -> Precision:
    """The precision a run trained in, as recorded in its config's `environment` (runs from before the record:
    its `train.precision`), resolved on `device`; for resuming and for measures that must match the training."""
    started_with = (config.environment or {}).get("precision")
    if config.train.precision != "auto" or not started_with:
        return resolve_precision(config.train.precision, device)
    kept = resolve_precision(started_with, device)
    return Precision(kept.name, f"kept from the run's start, {config.environment.get('precision_reason')}",
                     kept.warning)


def seed_everything(seed: int, device: torch.device) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        # CPU kernels are deterministic once the non-deterministic ones (e.g. index_add) are excluded.
        torch.use_deterministic_algorithms(True, warn_only=True)


def new_run_dir(config: RunConfig) -> Path:
    name = config.train.run_name or f"{config.recipe}-{config.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.train.out_dir) / name
    if (run_dir / CONFIG).exists():
        raise UserError(f"Run directory {run_dir} already holds a run; choose another train.run_name or "
                        f"continue it with `polyattn train --resume {run_dir}`.")
    return run_dir


def load_run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} does not exist; pass the directory a training run created.")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} has no {CONFIG}, so it is not a polyattn run directory.")
    return RunConfig.from_dict(load_yaml(run_dir / CONFIG), origin=str(run_dir / CONFIG))


def build_model(config: RunConfig, job_inferred: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    args = config.resolved_model_args(**job_inferred)
    model = get_entry(config.model.name).cls(**args)
    return model, args


def train(config: RunConfig, *, resume_dir: Path | None = None, evaluate: bool = True) -> dict[str, Any]:
    """Trains (or resumes) one run and returns its summary; see the module docstring.

    `evaluate=False` skips every evaluation (for throughput measurements); the summary then has no test metrics.
    """
    from ..tasks import build_job

    cfg = config.train
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = _training_precision(config, device, resuming=resume_dir is not None)
    seed_everything(cfg.seed, device)
    if cfg.batch_size % cfg.accumulation_steps:
        raise UserError(f"train.batch_size {cfg.batch_size} is not divisible by train.accumulation_steps "
                        f"{cfg.accumulation_steps}; make it a multiple.")

    job = build_job(config, device=device, run_dir=resume_dir)
    model, model_args = build_model(config, job.inferred_model_args)
    # The stored config holds every constructor argument, so the run directory rebuilds the model alone.
    config.model.args = model_args
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    total_steps = cfg.steps or cfg.epochs * job.steps_per_epoch
    num_epochs = math.ceil(total_steps / job.steps_per_epoch)
    announce(run_header("training", config, n_params, job, device, precision=precision,
                        extra=f"{total_steps} steps ({_epochs(total_steps / job.steps_per_epoch)}) of "
                              f"{job.samples_per_step} {getattr(job, 'throughput_unit', 'samples')}"
                              + (", compiled" if cfg.compile else "")), precision)
    soft_mask = None
    if cfg.soft_mask != "none":
        if "soft_mask_a" not in inspect.signature(model.forward).parameters:
            raise UserError(f"train.soft_mask needs a model whose forward takes soft_mask_a (such as iLLaMA); "
                            f"'{config.model.name}' does not, so set train.soft_mask=none.")
        soft_mask = SoftMaskSchedule(cfg.soft_mask, total_steps, cfg.soft_mask_cutoff, cfg.soft_mask_a0)

    run_dir = Path(resume_dir) if resume_dir is not None else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.environment = environment(device, precision)
    save_yaml(config.to_dict(), run_dir / CONFIG)
    save_job_files = getattr(job, "save_to_run_dir", None)  # files the run needs besides weights (a tokenizer)
    if save_job_files is not None:
        save_job_files(run_dir)
    unit = getattr(job, "throughput_unit", "samples")  # what `job.loss` counts: samples, or tokens for LMs

    ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay else None
    eval_model = ema.module if ema is not None else model  # the weights that evaluation and sampling use
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    schedule = CosineSchedule(cfg.lr, cfg.min_lr, round(cfg.warmup_epochs / cfg.epochs * total_steps), total_steps)
    checkpoints = CheckpointDir(run_dir)

    step, train_time, train_samples = 0, 0.0, 0
    if resume_dir is not None and (run_dir / "summary.json").is_file():
        raise UserError(f"Run {run_dir} already finished; evaluate it with `polyattn eval {run_dir}` or "
                        f"start a new run.")
    resume_from = checkpoints.latest() if resume_dir is not None else None
    if resume_dir is not None and resume_from is None:
        print(f"note: {run_dir} has no checkpoint yet; starting it from the beginning.", file=sys.stderr)
    if resume_from is not None:
        load_weights(model, resume_from / WEIGHTS, model_name=config.model.name)
        state = checkpoints.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        job.load_state_dict(state["job"])
        set_rng_state(state["rng"])
        step = state["step"]
        train_time, train_samples = state.get("train_time", 0.0), state.get("train_samples", 0)
        if ema is not None:
            if not (resume_from / EMA_WEIGHTS).is_file():
                raise UserError(f"Checkpoint {resume_from} has no {EMA_WEIGHTS}, so train.ema_decay cannot be "
                                f"turned on when resuming; resume without it or start a new run.")
            load_weights(ema.module, resume_from / EMA_WEIGHTS, model_name=config.model.name)
            ema.n_averaged.fill_(state["ema_updates"])
        print(f"resuming {run_dir} at step {step}/{total_steps}", file=sys.stderr)

    train_model = torch.compile(model) if cfg.compile else model
    autocast = autocast_for(precision, device)
    # float16 needs its loss scaled so small gradients do not flush to zero; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else torch.Tensor.backward
    if scaler is not None and resume_from is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    log = RunLog(run_dir, resume_step=step if resume_from is not None else None)
    if resume_from is None:
        log.log("run", 0, {"params": n_params, "model": config.model.name, **config.environment})

    def save_checkpoint() -> None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "job": job.state_dict(),
                 "rng": current_rng_state(), "train_time": train_time, "train_samples": train_samples}
        if ema is not None:
            state["ema_updates"] = ema.num_updates
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        checkpoints.save(step, model, state, model_name=config.model.name,
                         ema_model=None if ema is None else ema.module)

    budget = cfg.time_budget_s

    def schedule_step() -> int:
        """The step the schedules are read at: the step itself, or the budget's share of training if larger."""
        if budget is None:
            return step
        return max(step, min(total_steps, int(train_time / budget * total_steps)))

    progress = progress_bar(total=total_steps, initial=step, enabled=cfg.progress, unit="step", leave=True,
                            desc="training", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
                                                        "{postfix}")
    window_loss, window_n = 0.0, 0
    max_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    out_of_time = lambda: budget is not None and train_time >= budget
    try:
        while step < max_steps and not out_of_time():
            epoch, start = divmod(step, job.steps_per_epoch)
            model.train()
            for batch in job.batches(epoch, start):
                lr = schedule(schedule_step())
                for group in optimizer.param_groups:
                    group["lr"] = lr
                forward_kwargs = {"soft_mask_a": soft_mask(schedule_step())} if soft_mask else {}
                t0 = time.perf_counter()
                loss, n = job.loss(train_model, batch, accumulation_steps=cfg.accumulation_steps, autocast=autocast,
                                   forward_kwargs=forward_kwargs, backward=backward)
                loss_value = loss.item()  # one device sync per step, shared by the checks and logs below
                if not math.isfinite(loss_value):
                    raise UserError(f"The training loss became {loss_value} at step {step} (epoch {epoch}); "
                                    f"lower train.lr, keep train.grad_clip on, or check the data. The last "
                                    f"good checkpoint is in {checkpoints.root}.")
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                             if cfg.grad_clip else None)
                if scaler is not None:
                    scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_time += time.perf_counter() - t0
                train_samples += n
                step += 1
                window_loss, window_n = window_loss + loss_value, window_n + 1
                throughput = train_samples / max(train_time, 1e-9)
                progress.update(1)
                progress.set_postfix_str(f"epoch {epoch + 1}/{num_epochs} loss {loss_value:.4f} "
                                         f"lr {lr:.2e} {throughput:.0f} {unit}/s", refresh=False)
                if step % cfg.log_every == 0 or step == max_steps:
                    values = {"loss": window_loss / window_n, "lr": lr,
                              f"{unit}_per_s": throughput, "epoch": step / job.steps_per_epoch}
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    values.update(forward_kwargs)
                    log.log("train", step, values)
                    window_loss, window_n = 0.0, 0
                epoch_done = step % job.steps_per_epoch == 0
                if evaluate and epoch_done and ((step // job.steps_per_epoch) % cfg.eval_every == 0
                                                or step == total_steps):
                    metrics = job.evaluate(eval_model, job.eval_split, autocast=autocast)
                    log.log(job.eval_split, step, {**metrics, "epoch": step // job.steps_per_epoch})
                    note(_format_metrics(f"epoch {step // job.steps_per_epoch} {job.eval_split}", metrics))
                if epoch_done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save_checkpoint()
                if step >= max_steps or out_of_time():
                    break
    finally:
        progress.close()

    if out_of_time() and step % job.steps_per_epoch:
        save_checkpoint()  # the budget ended mid-epoch: keep the state the final weights came from
    test_metrics = job.evaluate(eval_model, "test", autocast=autocast) if evaluate else {}
    if test_metrics:
        log.log("test", step, test_metrics)
    save_weights(model, run_dir / WEIGHTS, model_name=config.model.name)
    if ema is not None:
        save_weights(ema.module, run_dir / EMA_WEIGHTS, model_name=config.model.name)
    summary = {
        "model": config.model.name,
        "params": n_params,
        "steps": step,
        "epochs": step / job.steps_per_epoch,
        f"train_{unit}_per_s": train_samples / train_time if train_time else None,
        "train_time_s": train_time,
        "test": test_metrics,
        "weights": "ema" if ema is not None else "model",
        "time_budget_s": budget,
        **environment(device, precision),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.close()
    write_plots(run_dir)
    rows = [("run", str(run_dir)), ("model", f"{config.model.name} ({n_params / 1e6:.2f}M params)"),
            ("steps", f"{step} ({summary['epochs']:.2f} epochs)")]
    if summary[f"train_{unit}_per_s"]:
        rows.append((f"train {unit}/s", f"{summary[f'train_{unit}_per_s']:.1f} ({train_time:.0f} s training)"))
    final = getattr(job, "final_split", "test")  # text: the held-out stream, which the README calls val
    rows += [(f"{final} {k}", _fmt(v)) for k, v in test_metrics.items()]
    print(format_table(rows, "summary"))
    return summary


@dataclass(frozen=True)
class Run:
    """A trained run loaded back from its directory (`load_run`); it unpacks as `model, config, tokenizer`."""

    model: nn.Module
    """The model with the run's trained weights, in eval mode."""
    config: RunConfig
    """The run's resolved config (`config.yaml`), with any overrides applied."""
    tokenizer: Any
    """Text runs: the run's tokenizer (byte-level, or its saved BPE model); None for image runs."""
    weights: str
    """Which weights were loaded: 'ema' (the averaged weights, train.ema_decay) or 'raw'."""
    source: Path
    """The weights file that was loaded (final weights, or the latest checkpoint's)."""

    def __iter__(self):
        return iter((self.model, self.config, self.tokenizer))


def load_run(run_dir: Path | str, *, ema: bool | None = None, device: torch.device | str = "cpu",
             overrides: list[str] | None = None) -> Run:
    """Loads any run directory: its model with trained weights (in eval mode), config and tokenizer.

    Final weights when the run finished, else its latest checkpoint's (with a note). `ema`: None uses the
    averaged weights when the run kept them (train.ema_decay), True requires them, False uses the raw weights.
    `overrides` (`key=value`) change the run's config before the model is built, e.g. an inference-time option.
    """
    from ..registry import model_task

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    apply_overrides(config, overrides or [])
    folder = run_dir
    if not (run_dir / WEIGHTS).is_file():
        folder = CheckpointDir(run_dir).latest()
        if folder is None:
            raise UserError(f"{run_dir} has neither final weights nor a checkpoint; train it first.")
        print(f"note: {run_dir} did not finish; using its latest checkpoint {folder.name}.", file=sys.stderr)
    weights, kind = folder / WEIGHTS, "raw"
    if ema is not False and (folder / EMA_WEIGHTS).is_file():
        weights, kind = folder / EMA_WEIGHTS, "ema"
    elif ema:
        raise UserError(f"{run_dir} kept no averaged weights (train.ema_decay was off); drop the EMA option.")
    model, _ = build_model(config, {})
    load_weights(model, weights, model_name=config.model.name)
    tokenizer = None
    if model_task(config.model.name) in ("causal_lm", "masked_lm"):
        from ..data.tokenizers import load_run_tokenizer

        tokenizer = load_run_tokenizer(run_dir, config.data.tokenizer)
    return Run(model.to(device).eval(), config, tokenizer, kind, weights)


def load_run_model(run_dir: Path, *, ema: bool | None = None, device: torch.device | str = "cpu",
                   overrides: list[str] | None = None) -> tuple[nn.Module, RunConfig]:
    """`load_run` without the tokenizer: the model (with its trained weights, in eval mode) and the config."""
    run = load_run(run_dir, ema=ema, device=device, overrides=overrides)
    return run.model, run.config


def evaluate_run(run_dir: Path, *, data_source: str | None = None, split: str = "test", device_name: str = "auto",
                 precision: str = "auto", ema: bool | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluates a finished run (or its latest checkpoint) with nothing but its directory; `overrides` change
    settings for this evaluation only (see `load_run_model`). `precision` is resolved on this device, whatever
    the run trained in (see `inference_precision`)."""
    from ..tasks import build_job

    device = resolve_device(device_name)
    run = load_run(run_dir, ema=ema, device=device, overrides=overrides)
    model, config = run.model, run.config
    resolved = inference_precision(precision, device, config)
    if data_source is not None:
        config.data.source = data_source
    job = build_job(config, device=device, splits=(split,), run_dir=Path(run_dir))
    n_params = sum(p.numel() for p in model.parameters())
    announce(run_header("evaluating", config, n_params, job, device, precision=resolved, weights=run.weights,
                        extra=f"split {split}, weights {run.source}"), resolved)
    metrics = job.evaluate(model, split, autocast=autocast_for(resolved, device))
    label = getattr(job, "final_split", "test") if split == "test" else split
    weights = "averaged (EMA) weights" if run.weights == "ema" else "raw weights"
    print(format_table([(f"{label} {k}", _fmt(v)) for k, v in metrics.items()],
                       f"{config.model.name} ({weights}) on {config.data.source}"))
    return metrics


def inference_precision(requested: str, device: torch.device, config: RunConfig) -> Precision:
    """The precision of an evaluation, generation or sampling command of a run on `device`.

    auto: the precision the run trained in (so `eval` reproduces the run's own numbers), unless that is a low
    precision this device does not compute natively, then float32: a run trained in bfloat16 on an AMX CPU should
    not evaluate 100x slower on an AVX2 laptop. An explicit precision is resolved as for training.
    """
    if requested != "auto":
        return resolve_precision(requested, device)
    trained = (config.environment or {}).get("precision") or config.train.precision
    if trained == "auto":
        return resolve_precision("auto", device)
    if trained == "fp32":
        return Precision("fp32", "auto: the run trained in fp32")
    here = resolve_precision("auto", device)
    native = here.name == "bf16" or (trained == "fp16" and device.type == "cuda")
    if native:
        return Precision(trained, f"auto: the run trained in {trained}, native on {device_name(device)}")
    return Precision("fp32", f"auto: the run trained in {trained}, which {device_name(device)} does not compute "
                             f"natively")


def announce(header: str, precision: Precision) -> None:
    """Prints a command's first line (`run_header`) and, when its precision is slow on this device, the warning
    that says what to set instead."""
    print(header, file=sys.stderr, flush=True)
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr, flush=True)


def run_header(verb: str, config: RunConfig, n_params: int, job, device: torch.device, *,
               precision: Precision | str, weights: str | None = None, extra: str = "") -> str:
    """The first line of a command: what runs on what, e.g. `training vit_nano (0.80M parameters) on digits
    (1,438 train / 359 test images, ...); cpu, bf16 (auto: ... has native bfloat16 products), 2 threads; 1120
    steps ...`."""
    if isinstance(precision, Precision):
        precision = precision.describe()
    data = job.describe_data() if hasattr(job, "describe_data") else config.data.source  # job None: no data read
    used = {"ema": ", averaged (EMA) weights", "raw": ", raw weights"}.get(weights or "", "")
    threads = torch.get_num_threads()
    return (f"{verb} {config.model.name} ({n_params / 1e6:.2f}M parameters{used}) on {data}; {device}, {precision}, "
            f"{threads} thread{'s' if threads > 1 else ''}" + (f"; {extra}" if extra else ""))


def _epochs(n: float) -> str:
    return f"{n:.3g} epoch{'' if n == 1 else 's'}"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _format_metrics(prefix: str, metrics: dict[str, float]) -> str:
    return prefix + ": " + " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


__all__ = ["Run", "TrainingJob", "announce", "evaluate_run", "inference_precision", "load_run", "load_run_config",
           "load_run_model", "run_header", "run_precision", "train"]
