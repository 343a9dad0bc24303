"""Schedules of model inputs that change during training, held by the loop instead of mutating the model.

An input schedule gives one keyword input of the model's forward a value per optimizer step: `start` at the first
step, moving to `end` over the first `until` share of training (at once, or linearly), then `end`. The loop steps
every schedule of the run's `schedules` section and passes the values to the task's loss, which passes them to
the model; it knows nothing of what they feed. iLLaMA's soft mask is one (arXiv 2404.06773, `mask_scheduler.py`):

    schedules:
      soft_mask_a: {shape: linear, start: 1.0, until: 0.17}

The share is of training, so small runs keep the paper's ratios (e.g. 50/300 epochs). Evaluation does not use
schedules: models are evaluated with their inputs' defaults (iLLaMA: the final causal mask, a = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..settings import Section, checked


@dataclass
class InputSchedule(Section):
    """The value of one model input per optimizer step (module docstring)."""

    shape: Literal["constant", "linear"] = checked("linear", fixed=True)
    """constant: `start` for the first `until` share of the steps, then `end` (an abrupt switch); linear: from
    `start` to `end` over that share (its last step is exactly `end`), then `end`."""
    start: float = checked(1.0, fixed=True)
    """The value at the first step (the soft mask: 1 = bidirectional)."""
    end: float = checked(0.0, fixed=True)
    """The value once the schedule has run (the soft mask: 0 = causal)."""
    until: float = checked(0.0, ge=0, le=1, fixed=True)
    """Share of training over which the value moves from start to end (iLLaMA's paper: 50/300 epochs ≈ 0.17)."""

    def at(self, step: int, total_steps: int) -> float:
        """The value at optimizer step `step` of `total_steps`."""
        early = round(self.until * total_steps)
        if step >= early:
            return self.end
        if self.shape == "constant":
            return self.start
        # linspace(start, end, early): the last early step is exactly `end`
        return self.end + (self.start - self.end) * (1.0 - step / (early - 1)) if early > 1 else self.end


__all__ = ["InputSchedule"]
