"""What is learned and measured: losses, metrics and the training jobs that feed the loop."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..registry import model_task


def build_job(config, *, device: torch.device, splits: tuple[str, ...] = ("train", "test"), run_dir=None):
    """The training job for the task of the config's model (see polyattn.train.loop.TrainingJob).

    `run_dir` is an existing run directory (resume, eval) whose saved files the job reuses (e.g. a tokenizer).
    """
    task = model_task(config.model.name)
    if task == "classification":
        from .image_classification import ImageClassificationJob

        return ImageClassificationJob(config, device, splits)
    if task == "causal_lm":
        from .causal_lm import CausalLMJob

        return CausalLMJob(config, device, splits, run_dir=run_dir)
    if task == "masked_lm":
        from .masked_lm import MaskedLMJob

        return MaskedLMJob(config, device, splits, run_dir=run_dir)
    if task == "diffusion":
        from .diffusion import DiffusionJob

        return DiffusionJob(config, device, splits)
    raise UserError(f"Training for task '{task}' (model '{config.model.name}') is not available yet.")
