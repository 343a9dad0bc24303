"""What is learned and measured: losses, metrics and the training jobs that feed the loop.

Each task declares its config sections (`TASKS`): its own `task` section (a `Section` dataclass in its module)
and the `data` section its job reads (`polyattn.data.config`: images or text).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..data.config import DataConfig, ImageDataConfig, TextDataConfig
from ..errors import UserError
from ..registry import model_task
from ..settings import Section
from .causal_lm import CausalLMConfig
from .classification import ClassificationConfig
from .diffusion import DiffusionConfig
from .masked_lm import MaskedLMConfig


@dataclass(frozen=True)
class TaskSpec:
    """A task as the run config and the training loop see it."""

    name: str
    """The task name models are registered for (`polyattn.registry`)."""
    section: type[Section]
    """The dataclass of its `task` section."""
    data: type[DataConfig]
    """The dataclass of the `data` section its job reads."""
    job: str
    """`module:Class` of its training job (imported on first use)."""
    modality: str
    """What its data are, in words ('images', 'text')."""

    def job_class(self) -> type:
        module, _, name = self.job.partition(":")
        return getattr(importlib.import_module(module, __name__), name)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("classification", ClassificationConfig, ImageDataConfig, ".image_classification:ImageClassificationJob",
             "images"),
    TaskSpec("diffusion", DiffusionConfig, ImageDataConfig, ".diffusion:DiffusionJob", "images"),
    TaskSpec("causal_lm", CausalLMConfig, TextDataConfig, ".causal_lm:CausalLMJob", "text"),
    TaskSpec("masked_lm", MaskedLMConfig, TextDataConfig, ".masked_lm:MaskedLMJob", "text"),
)}
"""Every trainable task by name."""


def task_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of a task name; a task without training is one sentence."""
    if task not in TASKS:
        raise UserError(f"Training for task '{task}' is not available yet; the tasks are {', '.join(TASKS)}.")
    return TASKS[task]


def build_job(config, *, device: torch.device, splits: tuple[str, ...] = ("train", "test"), run_dir=None):
    """The training job for the task of the config's model (see polyattn.train.loop.TrainingJob).

    `run_dir` is an existing run directory (resume, eval) whose saved files the job reuses (e.g. a tokenizer).
    """
    task = model_task(config.model.name)
    if task not in TASKS:
        raise UserError(f"Training for task '{task}' (model '{config.model.name}') is not available yet.")
    job = TASKS[task].job_class()
    if TASKS[task].data is TextDataConfig:
        return job(config, device, splits, run_dir=run_dir)
    return job(config, device, splits)


__all__ = ["TASKS", "TaskSpec", "build_job", "task_spec"]
