"""Exponential moving average of the weights, for evaluation and sampling (Polyak averaging).

Built on `torch.optim.swa_utils.AveragedModel`. The decay warms up as `min(decay, (1 + n) / (10 + n))` after `n`
updates, so a short run's average is not dominated by its random initialisation (the rule of TensorFlow's
`ExponentialMovingAverage` with `num_updates`). Buffers are copied from the trained model at every update
(`AveragedModel(use_buffers=False)`), since most hold constants (RoPE tables, masks, Performer's features),
except the running statistics of BatchNorm (the convolutional patch stem): those are averaged with the same
weight as the parameters, as timm's EMA does, so they describe the averaged weights' activations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, num_updates: int) -> float:
    """The decay used for the update after `num_updates` earlier ones."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class WeightEma(AveragedModel):
    """`AveragedModel` with the warmed-up EMA rule above; `.module` is the averaged copy of the model.

    Args:
        model (nn.Module): the trained model; copied, so it may keep training.
        decay (float): the EMA decay in (0, 1), e.g. 0.999 for runs of a few thousand steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        super().__init__(model, multi_avg_fn=self._lerp, use_buffers=False)
        self.module.eval().requires_grad_(False)

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1.0 - ema_decay_at(self.decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, weight)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Averages the parameters (and BatchNorm's running statistics) of `model` into the copy."""
        first = self.num_updates == 0
        weight = 1.0 - ema_decay_at(self.decay, self.num_updates)
        norms = _batch_norms(self.module)
        before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
        super().update_parameters(model)  # copies every buffer from `model`, the statistics included
        if not first:
            for m, (mean, var) in zip(norms, before, strict=True):
                m.running_mean.copy_(mean.lerp_(m.running_mean, weight))
                m.running_var.copy_(var.lerp_(m.running_var, weight))

    @property
    def num_updates(self) -> int:
        return int(self.n_averaged)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
