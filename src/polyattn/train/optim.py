"""AdamW with weight-decay exclusions, and the cosine learning-rate schedule with linear warmup."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed norms, biases, embeddings and position tables.

    A parameter is not decayed when it has fewer than 2 dimensions (biases, norm weights, per-head scalars),
    when it belongs to an nn.Embedding, or when the model lists it in `no_weight_decay()` (timm's contract,
    e.g. `pos_embed`, `cls_token`).
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = param.ndim < 2 or id(param) in embedding_params or name in skip or name.split(".")[-1] in skip
        (no_decay if excluded else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


class CosineSchedule:
    """Learning rate at an optimizer step: linear warmup from 0 to `lr`, then cosine decay to `min_lr`.

    Stateless: the value depends only on the step, so resuming needs nothing but the step counter.
    """

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        if total_steps <= 0:
            raise ValueError("total_steps must be positive")
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.total_steps = max(0, warmup_steps), total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
