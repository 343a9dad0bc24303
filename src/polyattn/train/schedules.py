"""Schedules of model inputs that change during training, held by the loop instead of mutating the model."""

from __future__ import annotations

from typing import Literal


class SoftMaskSchedule:
    """iLLaMA's soft-mask value `a` per optimizer step (arXiv 2404.06773, `mask_scheduler.py`).

    `constant`: `a0` for the first `cutoff · total_steps` steps, then exactly 0 (an abrupt switch).
    `linear`: `a0` decreasing linearly to 0 over the same span (endpoint 0 included), then 0.
    The cutoff is a fraction of training, so small runs keep the paper's ratios (e.g. 50/300 epochs).
    Evaluation does not use this: models are evaluated with their final causal mask (a = 0).
    """

    def __init__(self, mode: Literal["constant", "linear"], total_steps: int, cutoff: float, a0: float = 1.0):
        if mode not in ("constant", "linear"):
            raise ValueError(f"soft-mask schedule must be 'constant' or 'linear', got {mode!r}")
        if not 0.0 <= cutoff <= 1.0:
            raise ValueError(f"soft-mask cutoff is a fraction of training in [0, 1], got {cutoff}")
        self.mode, self.a0 = mode, a0
        self.early = round(cutoff * total_steps)

    def __call__(self, step: int) -> float:
        if step >= self.early:
            return 0.0
        if self.mode == "constant":
            return self.a0
        # linspace(a0, 0, early): the last early step is exactly 0
        return self.a0 * (1.0 - step / (self.early - 1)) if self.early > 1 else 0.0
