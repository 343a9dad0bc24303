"""The training loop: one loop for every model and task.

The loop sees a model (an nn.Module) and a `TrainingJob` that supplies batches, the loss and the
evaluation; it owns the step (splitting a batch into micro-batches, weighting them, backward, clipping, the
optimizer update), the schedules of learning rate and model inputs, precision, checkpoints, logging and exact
resume. Resuming restores the weights, the optimizer moments, the RNG states (torch, numpy, python
and the job's augmentation generator) and the position in the epoch, so a resumed run reproduces the
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import distributed
from ..errors import Interrupted, UserError
from ..files import atomic_write_text, write_error
from ..hardware import Precision, autocast_for, device_name, environment, resolve_device, resolve_precision
from ..layers.linear_attention import random_feature_layers, redraw_random_features
from ..progress import clock, note, progress_bar
from ..registry import get_entry, parameter_count
from ..settings import fixed_on_resume
from .checkpoint import (
    CONFIG,
    EMA_WEIGHTS,
    ORIGINAL_CONFIG,
    WEIGHTS,
    CheckpointDir,
    RunDirLock,
    claim_new_run_dir,
    load_checkpoint_weights,
    load_weights,
    remove_temporaries,
    save_weights,
    set_rng_state,
)
from .checkpoint import rng_state as current_rng_state
from .config import RunConfig, apply_overrides, load_yaml, save_yaml
from .ema import WeightEma
from .optim import CosineSchedule, build_optimizer
from .run_log import RunLog, format_table, write_plots
from .sharding import (
    check_fsdp,
    checkpoint_blocks,
    full,
    full_state_dict,
    gathered,
    local,
    repeated_blocks,
    shard_model,
)


class TrainingJob(Protocol):
    """What a task supplies to the loop (see polyattn.tasks).

    Optional: `throughput_unit` (what `samples_per_step` counts, e.g. "tokens"; default "samples"),
    `save_to_run_dir(run_dir)` (files the run directory needs besides the weights, such as a tokenizer),
    `describe_data()` (one line on the data, for a command's first line), `final_split` (what the README calls
    the split of the final evaluation, default "test"; text jobs: "val"), `progress` (show evaluation bars) and
    `check_model(model)` (raises a UserError for a model that cannot do the job, before anything is written).
    """

    inferred_model_args: dict[str, Any]
    """Model arguments that follow from the data (e.g. num_classes, img_size), used unless the user set them."""
    steps_per_epoch: int
    eval_split: str
    """The split evaluated during training ('val' or 'test')."""

    samples_per_step: int
    """What one optimizer step processes, in `throughput_unit`s (samples, or tokens): the throughput's count."""

    def batches(self, epoch: int, start_step: int): ...
    """Iterator over the optimizer-step batches of one epoch, starting at `start_step`."""

    def prepare(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """One step's batch ready for the model, on the device: every random draw over the whole batch is made
        here (augmentation, mixing, noise), so it does not depend on the split into micro-batches. Every tensor's
        first dimension is the batch's rows; the loop splits them into `train.accumulation_steps` micro-batches."""
        ...

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...],
             inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed loss of one micro-batch (a tensor, float32) and the number of terms it sums (an int, counted
        without a device sync), passing `inputs` (the scheduled model inputs, such as `soft_mask_a`) to the model.
        The loop averages over the whole step's count, so accumulation gives the gradient of one big batch."""
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
    """The directory a new run will own (created and locked by `claim_new_run_dir` once the run can start)."""
    name = config.train.run_name or f"{config.recipe}-{config.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.train.out_dir) / name
    if (run_dir / CONFIG).exists():
        raise UserError(f"Run directory {run_dir} already holds a run; choose another train.run_name or "
                        f"continue it with `polyattn train --resume {run_dir}`.")
    return run_dir


def resume_changes(stored: RunConfig, config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The settings `config` changes relative to the run's stored config: `{"train.lr": (old, new)}`."""
    a, b = stored.to_dict(), config.to_dict()
    changes = {}
    for section in RunConfig.SECTIONS:
        for key in [*a[section], *(k for k in b[section] if k not in a[section])]:
            if a[section].get(key) != b[section].get(key):
                changes[f"{section}.{key}"] = (a[section].get(key), b[section].get(key))
    return changes


def check_resume_changes(changes: dict[str, tuple[Any, Any]], config: RunConfig, *, force: bool) -> None:
    """A resumed run keeps its model; it keeps its data, task and the training settings that shape the
    trajectory (fields whose Rule is `fixed`) unless forced, since the result would not be the run's."""
    model = [k for k in changes if k.startswith("model.")]
    if model:
        raise UserError(f"A resumed run cannot change its model section ({', '.join(model)}); its weights would "
                        f"not fit. Start a new run.")
    fixed = {f"train.{name}" for name in fixed_on_resume(config.train)}
    breaking = [k for k in changes if k.startswith(("data.", "task.", "schedules.")) or k in fixed]
    if breaking and not force:
        listed = ", ".join(f"{k} {changes[k][0]!r} → {changes[k][1]!r}" for k in breaking)
        raise UserError(f"Resuming with changed {listed} would not reproduce the run; resume without the change, "
                        f"pass --force to resume anyway, or start a new run.")


def load_run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} does not exist; pass the directory a training run created.")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} has no {CONFIG}, so it is not a polyattn run directory.")
    return RunConfig.from_dict(load_yaml(run_dir / CONFIG), origin=str(run_dir / CONFIG))


def build_model(config: RunConfig, job_inferred: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    args = config.resolved_model_args(**job_inferred)
    try:
        model = get_entry(config.model.name).cls(**args)
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # a constructor's own check of its arguments (e.g. heads and width)
        raise UserError(f"Model '{config.model.name}' cannot be built with these arguments: {err}; change the "
                        f"model.* settings.") from err
    return model, args


def train(config: RunConfig, *, resume_dir: Path | None = None, evaluate: bool = True,
          force: bool = False) -> dict[str, Any]:
    """Trains (or resumes) one run and returns its summary; see the module docstring.

    `evaluate=False` skips every evaluation (for throughput measurements); the summary then has no test metrics.
    `force` lets a resumed run change settings that make it differ from the uninterrupted run (see
    `check_resume_changes`).

    Everything that can be checked is checked before the run directory is created (the config's rules, the
    data, the model's arguments), so a bad start writes nothing. The directory is then created atomically and
    locked for the run's lifetime.
    """
    config.validate()
    cfg = config.train
    changes: dict[str, tuple[Any, Any]] = {}
    if resume_dir is not None:
        changes = resume_changes(load_run_config(Path(resume_dir)), config)
        check_resume_changes(changes, config, force=force)
        if (Path(resume_dir) / "summary.json").is_file():
            raise UserError(f"Run {resume_dir} already finished; evaluate it with `polyattn eval {resume_dir}` or "
                            f"start a new run.")
    device = resolve_device(cfg.device)
    joined = distributed.launched() and not distributed.active()
    distributed.init(device.type, cfg.collective_timeout_s)  # under torchrun: join the group (gloo or nccl)
    threads = torch.get_num_threads()
    try:
        return _train_distributed(config, device, resume_dir, changes, evaluate=evaluate)
    finally:
        # train.threads is this run's: a caller that trains again (a comparison suite's next row, whose step
        # budget was calibrated at the default thread count) must find the process as it was
        torch.set_num_threads(threads)
        if joined:
            distributed.shutdown()


def _train_distributed(config: RunConfig, device: torch.device, resume_dir: Path | None,
                       changes: dict[str, tuple[Any, Any]], *, evaluate: bool) -> dict[str, Any]:
    """`train` once this process is in its process group (or alone)."""
    from ..tasks import build_job

    cfg = config.train
    world = distributed.world_size()
    if device.type == "cuda" and world > 1:  # one GPU per process, by its index on the machine
        device = torch.device("cuda", distributed.local_rank())
        torch.cuda.set_device(device)
    if cfg.batch_size % (world * cfg.accumulation_steps):
        raise UserError(f"train.batch_size {cfg.batch_size} is not divisible by {world} processes × "
                        f"train.accumulation_steps {cfg.accumulation_steps}; make it a multiple of "
                        f"{world * cfg.accumulation_steps}.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = _training_precision(config, device, resuming=resume_dir is not None)
    seed_everything(cfg.seed, device)

    job = build_job(config, device=device, run_dir=resume_dir)
    model, model_args = build_model(config, job.inferred_model_args)
    # The stored config holds every constructor argument, so the run directory rebuilds the model alone.
    config.model.args = model_args
    if config.deploy:  # a pruned run being fine-tuned: its smaller shapes, as load_run builds them
        if any(r.get("transform") == "quantize" for r in config.deploy):
            raise UserError("A quantized run cannot be trained (its weights are integer buffers, not parameters); "
                            "fine-tune the float run, then quantize it.")
        from ..deploy.record import rebuild

        model = rebuild(model, config.deploy)
    if cfg.init_weights is not None:  # a fine-tune; a resumed run then loads its checkpoint over them
        load_weights(model, Path(cfg.init_weights), model_name=config.model.name)
    model.to(device)
    n_params = parameter_count(model)
    total_steps = cfg.steps or cfg.epochs * job.steps_per_epoch
    check_model = getattr(job, "check_model", None)
    if check_model is not None:
        check_model(model)
    if cfg.activation_checkpointing and not repeated_blocks(model):
        raise UserError(f"train.activation_checkpointing recomputes the repeated blocks a model calls (the members "
                        f"of its nn.ModuleLists), but '{config.model.name}' has none (a reversible stack recomputes "
                        f"its own); set it to false.")
    if cfg.feature_redraw_every is not None and not random_feature_layers(model):
        raise UserError(f"train.feature_redraw_every redraws the random features of Performer attention, but "
                        f"'{config.model.name}' has none (only model.mixer=performer has); set it to null.")
    if cfg.fsdp and world > 1:
        check_fsdp(ema=cfg.ema_decay is not None, precision=precision.name)
    elif cfg.fsdp and distributed.is_main():  # kept in the config, so the run resumes sharded on several
        note("note: train.fsdp shards the model over the processes of a distributed run; alone, this process "
             "trains it whole (launch with --nproc N or torchrun to shard it).")

    main = distributed.is_main()
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        lock = RunDirLock(run_dir) if main else None
    else:
        if config.train.run_name is None and distributed.active():  # one name for every process: rank 0's clock
            config.train.run_name = distributed.broadcast(new_run_dir(config).name)
        run_dir = new_run_dir(config)
        lock = claim_new_run_dir(run_dir) if main else None
    distributed.barrier()  # the others start once rank 0 owns the run directory
    try:
        return _train_in(run_dir, config, job, model, n_params, total_steps, device, precision,
                         resuming=resume_dir is not None, changes=changes, evaluate=evaluate)
    finally:
        if lock is not None:
            lock.release()


def _train_in(run_dir: Path, config: RunConfig, job, model: nn.Module, n_params: int, total_steps: int,
              device: torch.device, precision: Precision, *,
              resuming: bool, changes: dict[str, tuple[Any, Any]], evaluate: bool) -> dict[str, Any]:
    """The training loop proper, in a run directory this process has locked (see `train`)."""
    cfg = config.train
    num_epochs = math.ceil(total_steps / job.steps_per_epoch)
    main, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
    if resuming and main:
        for path in remove_temporaries(run_dir):
            print(f"note: removed {path}, left by an interrupted write.", file=sys.stderr)
        if changes:  # allowed (or forced) changes: kept, never silently; the original config stays beside them
            original = run_dir / ORIGINAL_CONFIG
            if not original.exists():
                atomic_write_text(original, (run_dir / CONFIG).read_text())
            listed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items())
            print(f"note: resuming with {listed}; {CONFIG} now holds them, the first settings are in "
                  f"{ORIGINAL_CONFIG}.", file=sys.stderr)
    if config.environment is None:  # recorded at the run's start; a resumed run keeps its first record
        config.environment = environment(device, precision)
    if main and (not resuming or changes):
        save_yaml(config.to_dict(), run_dir / CONFIG)
    save_job_files = getattr(job, "save_to_run_dir", None)  # files the run needs besides weights (a tokenizer)
    if save_job_files is not None and main:
        try:
            save_job_files(run_dir)
        except OSError as err:
            raise write_error(Path(err.filename or run_dir), err) from err
    unit = getattr(job, "throughput_unit", "samples")  # what `job.samples_per_step` counts: samples, or tokens

    ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay else None
    eval_model = ema.module if ema is not None else model  # the weights that evaluation and sampling use
    # the layout in memory, before the optimizer sees the parameters (FSDP makes them DTensor shards)
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    sharded = cfg.fsdp and world > 1
    if sharded:
        shard_model(model, device, bf16=precision.name == "bf16")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    schedule = CosineSchedule(cfg.lr, cfg.min_lr, round(cfg.warmup_epochs / cfg.epochs * total_steps), total_steps)
    checkpoints = CheckpointDir(run_dir)
    params = [p for p in model.parameters() if p.requires_grad]

    step, train_time, train_samples, bad_steps = 0, 0.0, 0, 0
    resume_from = checkpoints.latest() if resuming else None
    if resuming and resume_from is None:
        if checkpoints.candidates():
            raise UserError(f"Every checkpoint in {checkpoints.root} is damaged, so {run_dir} cannot be resumed "
                            f"exactly; start a new run.")
        if main:
            print(f"note: {run_dir} has no checkpoint yet; starting it from the beginning.", file=sys.stderr)
    rank_rng = None
    if resume_from is not None:
        for path in checkpoints.discard_after(resume_from) if main else ():
            print(f"note: removed the damaged checkpoint {path}; training repeats its steps.", file=sys.stderr)
        # a checkpoint of any number of processes: resharded by DCP, or one process's whole files
        state = checkpoints.load_training(resume_from, model, optimizer, model_name=config.model.name)
        job.load_state_dict(state["job"])
        rank_rng = state.get("rank_rng")  # a distributed run's: every process's own stream, if it had as many
        set_rng_state(rank_rng[rank] if rank_rng is not None and len(rank_rng) == world else state["rng"])
        step = state["step"]
        train_time, train_samples = state.get("train_time", 0.0), state.get("train_samples", 0)
        bad_steps = state.get("bad_steps", 0)
        if ema is not None:
            if not (resume_from / EMA_WEIGHTS).is_file():
                raise UserError(f"Checkpoint {resume_from} has no {EMA_WEIGHTS}, so train.ema_decay cannot be "
                                f"turned on when resuming; resume without it or start a new run.")
            load_weights(ema.module, resume_from / EMA_WEIGHTS, model_name=config.model.name)
            ema.n_averaged.fill_(state["ema_updates"])
        if main:
            print(f"resuming {run_dir} at step {step}/{total_steps} from {resume_from.name}", file=sys.stderr)
    if rank > 0 and not (resume_from is not None and rank_rng is not None and len(rank_rng) == world):
        # dropout and the like: a stream of this process's own (rank 0 keeps the one process's stream)
        torch.manual_seed((cfg.seed * 1_000_003 + step * 7919 + rank) % 2**63)

    # the first line, once everything that can fail on bad input (data, model, run directory, checkpoint) passed
    if main:
        announce(run_header("training", config, n_params, job, device, precision=precision,
                            extra=f"{total_steps} steps ({_epochs(total_steps / job.steps_per_epoch)}) of "
                                  f"{job.samples_per_step} {getattr(job, 'throughput_unit', 'samples')}"
                                  + (", compiled" if cfg.compile else "")
                                  + (f", {world} processes ({_backend()})" if world > 1 else "")), precision)
    train_model = ddp_model = model
    if world > 1 and not sharded:  # gradients averaged over the processes during the last micro-batch's backward
        from torch.nn.parallel import DistributedDataParallel

        train_model = ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    autocast = autocast_for(precision, device)
    # float16 needs its loss scaled so small gradients do not flush to zero; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else torch.Tensor.backward
    micro_batches = cfg.accumulation_steps
    if scaler is not None and resume_from is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    log = RunLog(run_dir, resume_step=step if resume_from is not None else None) if main else _NoLog()
    if resume_from is None:
        log.log("run", 0, {"params": n_params, "model": config.model.name, **config.environment})
    if changes:
        log.log("resume", step, {"changed": {k: new for k, (_, new) in changes.items()}})

    def snapshot() -> dict[str, Any]:
        """The training state at this step boundary, except the optimizer's (unchanged until its next step)."""
        state = {"step": step, "job": job.state_dict(), "rng": current_rng_state(), "train_time": train_time,
                 "train_samples": train_samples, "bad_steps": bad_steps}
        if ema is not None:
            state["ema_updates"] = ema.num_updates
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        return state

    last_saved: list = [None, time.monotonic()]  # (path of the last checkpoint written, when)

    def write_checkpoint(state: dict[str, Any], *, verified: bool) -> None:
        """Writes a snapshot taken at a step boundary, before the weights change again.

        `verified`: the weights produced a finite loss at the next step (the usual case: checkpoints wait for
        that step). Otherwise (the run is stopping) the weights are checked to be finite here, one sync.
        """
        if not verified:  # each process checks its shards (FSDP) or its replica, and they agree
            tensors = [*map(local, model.parameters()), *(ema.module.parameters() if ema is not None else ())]
            finite = not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
            if not all(distributed.all_gather(finite)):
                if main:
                    print(f"warning: the weights at step {state['step']} are not finite; no checkpoint written.",
                          file=sys.stderr)
                return
        if world > 1:  # every process writes its part of the model and optimizer (DCP), rank 0 the rest
            last_saved[0] = checkpoints.save_distributed(state["step"], model, optimizer, state,
                                                         model_name=config.model.name,
                                                         ema_model=None if ema is None else ema.module)
        else:
            last_saved[0] = checkpoints.save(state["step"], model, {**state, "optimizer": optimizer.state_dict()},
                                             model_name=config.model.name,
                                             ema_model=None if ema is None else ema.module)
        last_saved[1] = time.monotonic()

    budget = cfg.time_budget_s

    def agreed_time() -> float:
        """Training time so far, the same on every process: rank 0's as of the last step's collective."""
        return synced_time[0] if world > 1 else train_time

    def schedule_step() -> int:
        """The step the schedules are read at: the step itself, or the budget's share of training if larger."""
        if budget is None:
            return step
        return max(step, min(total_steps, int(agreed_time() / budget * total_steps)))

    def accumulate(batch: tuple[torch.Tensor, ...], inputs: dict[str, Any]) -> torch.Tensor:
        """Forward and backward over the micro-batches of one step; returns the step's mean loss (detached) and
        leaves the gradient of that mean in `.grad` (unscaled under float16).

        Each micro-batch's summed loss is scaled by the nominal count of a step (`job.samples_per_step`) before
        its backward, so the gradients have the magnitude of a mean; once the step's true count is known (a masked
        LM scores ~15% of its tokens, Perceiver AR only its latents), one multiplication makes them exactly the
        gradient of the sum over the step divided by that count. Nothing is done twice and nothing syncs.
        """
        nominal = job.samples_per_step
        if world > 1:  # this process's rows of the global batch (the same batch, draws included, as one process)
            rows = len(batch[0]) // world
            batch = tuple(t[rank * rows:(rank + 1) * rows] for t in batch)
        total, count = torch.zeros((), device=device), 0
        micros = list(zip(*(t.chunk(micro_batches) for t in batch)))
        for i, micro in enumerate(micros):
            # DDP (and FSDP) average gradients over the processes during the last micro-batch's backward only
            quiet = ddp_model.no_sync() if world > 1 and not sharded and i < len(micros) - 1 else \
                contextlib.nullcontext()
            if sharded:
                model.set_requires_gradient_sync(i == len(micros) - 1)
            with quiet:
                with autocast():
                    loss_sum, n = job.loss(train_model, micro, inputs)
                backward(loss_sum * (world / nominal))  # × world: DDP's average over processes becomes a sum
            total, count = total + loss_sum.detach().float(), count + n
        if world > 1:  # the step's loss and count over every process, and whether any must stop
            synced = torch.stack([total, torch.tensor(float(count), device=device),
                                  torch.tensor(float(stop.received is not None), device=device),
                                  torch.tensor(train_time if main else 0.0, device=device, dtype=torch.float32),
                                  torch.tensor(time.monotonic() - last_saved[1] if main else 0.0, device=device)])
            torch.distributed.all_reduce(synced)
            total, count = synced[0], int(synced[1].item())
            stop_requested[0] = stop_requested[0] or synced[2].item() > 0
            synced_time[0] = float(synced[3].item())
            synced_since_saved[0] = float(synced[4].item())
        if scaler is not None:
            scaler.unscale_(optimizer)  # the true gradients: their norm, finiteness and clipping
        if count != nominal and count > 0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(nominal / count)
        return total / max(count, 1)

    # agreed by every process at each step (see accumulate): a stop request, rank 0's clocks
    stop_requested, synced_time, synced_since_saved = [False], [0.0], [0.0]

    # under a time budget the run ends on the clock, not at total_steps, so the bar's own ETA would be wrong:
    # the budget's remaining time is shown instead (in the postfix)
    eta = "" if budget is not None else "<{remaining}"
    progress = progress_bar(total=total_steps, initial=step, enabled=cfg.progress, unit="step", leave=True,
                            desc="training", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}" + eta + "]"
                                                        "{postfix}")
    window_loss, window_n, bad_in_row = 0.0, 0, 0
    pending = None  # a checkpoint due at the last step boundary, written once the next loss shows it is good
    max_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    out_of_time = lambda: budget is not None and agreed_time() >= budget
    stop = _StopSignals()
    try:
        while step < max_steps and not out_of_time():
            epoch, start = divmod(step, job.steps_per_epoch)
            model.train()
            for batch in job.batches(epoch, start):
                lr = schedule(schedule_step())
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs = {name: s.at(schedule_step(), total_steps) for name, s in config.schedules.items()}
                t0 = time.perf_counter()
                loss = accumulate(job.prepare(batch), inputs)
                grads = [p.grad for p in params if p.grad is not None]
                # FSDP: a DTensor, the norm of every process's shards (one all-reduce)
                grad_norm = nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
                # the one device sync per step, shared by the checks and logs below
                loss_value, norm_value = torch.stack([loss.detach().float(), full(grad_norm).float()]).tolist()
                if math.isfinite(loss_value) and pending is not None:
                    t1 = time.perf_counter()
                    write_checkpoint(pending, verified=True)  # the weights of that boundary gave a finite loss
                    t0 += time.perf_counter() - t1
                pending = None
                overflow = scaler is not None and math.isfinite(loss_value) and not math.isfinite(norm_value)
                if math.isfinite(loss_value) and math.isfinite(norm_value):
                    bad_in_row = 0
                    if cfg.grad_clip:
                        nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
                    if scaler is not None:
                        scaler.step(optimizer)
                    else:
                        optimizer.step()
                    if ema is not None:
                        ema.update_parameters(model)
                elif overflow:  # float16: the scaled gradients overflowed; the scaler skips this update, lowers
                    scaler.step(optimizer)  # its scale and the step counts as done (as in every fp16 recipe)
                else:  # skipped: no update, so the weights stay those that gave the last finite loss
                    bad_in_row, bad_steps = bad_in_row + 1, bad_steps + 1
                    (progress.write if main else _quiet)(
                        f"warning: step {step}: loss {loss_value}, gradient norm {norm_value}; step skipped "
                        f"({bad_in_row} of at most {cfg.max_bad_steps} in a row).")
                if scaler is not None:
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_time += time.perf_counter() - t0
                train_samples += job.samples_per_step
                step += 1
                if cfg.feature_redraw_every and step % cfg.feature_redraw_every == 0:
                    redraw_seed = cfg.seed * 1_000_003 + step  # the same draw on every process and on resume
                    redraw_random_features(model, redraw_seed)
                    if ema is not None:  # the averaged copy keeps its buffers; it must use the same features
                        redraw_random_features(ema.module, redraw_seed)
                if bad_in_row >= cfg.max_bad_steps:
                    good = last_saved[0] or next(iter(checkpoints.candidates()), None)
                    where = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
                    raise UserError(f"Training stopped at step {step}: the loss or gradient norm was not finite "
                                    f"for {bad_in_row} steps in a row (last: loss {loss_value}, gradient norm "
                                    f"{norm_value}); lower train.lr, keep train.grad_clip on, or check the data; "
                                    f"{where}.")
                if bad_in_row == 0:
                    window_loss, window_n = window_loss + loss_value, window_n + 1
                throughput = train_samples / max(train_time, 1e-9)
                progress.update(1)
                left = "" if budget is None else \
                    f", {clock(max(budget - agreed_time(), 0.0))} of the time budget left"
                progress.set_postfix_str(f"epoch {epoch + 1}/{num_epochs} loss {loss_value:.4f} "
                                         f"lr {lr:.2e} {throughput:.0f} {unit}/s{left}", refresh=False)
                if step % cfg.log_every == 0 or step == max_steps:
                    values = {"loss": window_loss / window_n if window_n else float("nan"), "lr": lr,
                              f"{unit}_per_s": throughput, "epoch": step / job.steps_per_epoch}
                    if cfg.grad_clip:
                        values["grad_norm"] = norm_value
                    if bad_steps:
                        values["bad_steps"] = bad_steps
                    values.update(inputs)
                    log.log("train", step, values)
                    window_loss, window_n = 0.0, 0
                epoch_done = step % job.steps_per_epoch == 0
                if evaluate and epoch_done and ((step // job.steps_per_epoch) % cfg.eval_every == 0
                                                or step == total_steps):
                    with gathered(eval_model):  # FSDP: the processes evaluate different numbers of batches
                        metrics = job.evaluate(eval_model, job.eval_split, autocast=autocast)
                    log.log(job.eval_split, step, {**metrics, "epoch": step // job.steps_per_epoch})
                    if main:
                        note(_format_metrics(f"epoch {step // job.steps_per_epoch} {job.eval_split}", metrics))
                if bad_in_row == 0 and (
                        epoch_done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                        or (cfg.checkpoint_every_s and (synced_since_saved[0] if world > 1 else
                                                        time.monotonic() - last_saved[1]) >= cfg.checkpoint_every_s)):
                    pending = snapshot()
                if stop.received is not None or stop_requested[0]:  # every process agrees, at the same step
                    if bad_in_row == 0:
                        write_checkpoint(pending or snapshot(), verified=False)
                    saved = last_saved[0] if main else checkpoints.latest()
                    signal_name = stop.received or "SIGTERM"
                    raise Interrupted(f"Training stopped by {signal_name} at step {step}; "
                                      + (f"the checkpoint {saved} holds it, so continue with "
                                         f"`polyattn train --resume {run_dir}`." if saved is not None else
                                         "no checkpoint was written."), signal_name=signal_name)
                if step >= max_steps or out_of_time():
                    break
    except RuntimeError as err:  # a peer died or stalled: one sentence, within the timeout
        if world == 1 or not _lost_peers(err):
            log.close()
            raise
        log.close()
        good = checkpoints.latest()
        raise UserError(f"Process {rank} of {world} lost the other processes at step {step} (a process died or "
                        f"stalled for over train.collective_timeout_s = {cfg.collective_timeout_s:g} s: "
                        f"{str(err).splitlines()[0].split('. ')[0][:160]}); "
                        + (f"the last complete checkpoint is {good}; continue with the same launch and "
                           f"`--resume {run_dir}`." if good else "no checkpoint was written.")) from err
    except BaseException:
        log.close()
        raise
    finally:
        stop.restore()
        progress.close()

    if bad_in_row == 0:  # training stopped at its end or on time: keep the state the final weights came from
        write_checkpoint(pending or snapshot(), verified=False)
    with gathered(eval_model):
        test_metrics = job.evaluate(eval_model, "test", autocast=autocast) if evaluate else {}
    if test_metrics:
        log.log("test", step, test_metrics)
    summary = {
        "model": config.model.name,
        "params": n_params,
        "steps": step,
        "epochs": step / job.steps_per_epoch,
        f"train_{unit}_per_s": train_samples / train_time if train_time else None,
        "train_time_s": train_time,
        "bad_steps": bad_steps,
        "test": test_metrics,
        "weights": "ema" if ema is not None else "model",
        "time_budget_s": budget,
        **environment(device, precision),
    }
    if world > 1:
        summary["processes"] = world
    weights = full_state_dict(model)  # FSDP: gathered to rank 0 (every process takes part), one plain file
    if not main:  # rank 0 writes the run's files and prints its summary
        return summary
    save_weights(weights, run_dir / WEIGHTS, model_name=config.model.name)
    if ema is not None:
        save_weights(ema.module, run_dir / EMA_WEIGHTS, model_name=config.model.name)
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


class _NoLog:
    """The run log of a process other than rank 0: records nothing (rank 0 writes the run's log)."""

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _quiet(*args, **kwargs) -> None:
    """Print nothing: processes other than rank 0 are quiet."""


def _lost_peers(err: RuntimeError) -> bool:
    """Whether an error inside a distributed step says the other processes are gone (a closed connection or a
    collective's timeout; gloo raises them as plain RuntimeErrors, in DDP's backward hook too)."""
    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(
        word in text for word in ("Connection closed", "Connection reset", "timed out", "Timed out", "Broken pipe",
                                  "NCCL", "gloo"))


def _backend() -> str:
    return torch.distributed.get_backend() if distributed.active() else "none"


class _StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary, with a checkpoint.

    A second signal of either kind stops at once (KeyboardInterrupt). Installed only in the main thread,
    where Python delivers signals; the previous handlers come back with `restore`.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


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
    config.validate()
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
    if config.deploy:  # a quantized run: its modules take the stored shapes and dtypes before the weights load
        from ..deploy.record import rebuild

        model = rebuild(model, config.deploy)
    if kind == "raw" and folder != run_dir:  # a checkpoint: one process's file, or a distributed run's shards
        load_checkpoint_weights(model, folder, model_name=config.model.name)
    else:
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
    n_params = parameter_count(model)
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
