"""The training engine: one loop for every model, its configuration, optimizer, schedules, EMA, checkpoints, run
logs and the model's layout in memory (activation checkpointing, FSDP). It knows nothing about particular models;
a task supplies a `TrainingJob` (see `polyattn.tasks`).

`train(build_config("default", ["train.epochs=1"]))` trains a recipe from Python; `load_run(RUN_DIR)` gives back
a trained run's model, config and tokenizer.
"""

from ..files import atomic_write_text
from .checkpoint import CheckpointDir, load_weights, save_weights
from .config import (
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    build_config,
    config_keys,
    find_recipe,
    list_recipes,
)
from .ema import WeightEma
from .loop import (
    Run,
    TrainingJob,
    build_model,
    evaluate_run,
    load_run,
    load_run_config,
    load_run_model,
    train,
)
from .optim import CosineSchedule, build_optimizer, param_groups
from .run_log import RunLog, read_metrics, write_plots
from .schedules import InputSchedule
from .sharding import checkpoint_blocks, repeated_blocks, shard_model

__all__ = [
    "CheckpointDir",
    "CosineSchedule",
    "InputSchedule",
    "ModelConfig",
    "Run",
    "RunConfig",
    "RunLog",
    "TrainConfig",
    "TrainingJob",
    "WeightEma",
    "apply_overrides",
    "atomic_write_text",
    "build_config",
    "build_model",
    "build_optimizer",
    "checkpoint_blocks",
    "config_keys",
    "evaluate_run",
    "find_recipe",
    "list_recipes",
    "load_run",
    "load_run_config",
    "load_run_model",
    "load_weights",
    "param_groups",
    "read_metrics",
    "repeated_blocks",
    "save_weights",
    "shard_model",
    "train",
    "write_plots",
]
