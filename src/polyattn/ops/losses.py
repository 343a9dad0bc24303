"""The cross-entropy every loss and metric of the library uses, and the target id that it skips.

One function for classification (class indices or soft targets, label smoothing), next-token and masked-token
prediction (ignored positions), in float32 whatever the logits' dtype, and reduced to a mean (a model's own
loss), a sum (what the training loop accumulates over micro-batches and processes, and evaluations over batches)
or per target.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""A target id that is not scored: padding, the unmasked tokens of a masked LM, targets an earlier window scored."""


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, reduction: Literal["mean", "sum", "none"] = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy (nats) of `logits [..., C]` against `targets`, in float32.

    Args:
        logits (Tensor): `[..., C]`, any float dtype.
        targets (Tensor): class indices `[...]` (int64; `IGNORE_INDEX` = not scored), or class probabilities
            `[..., C]` (soft targets, e.g. from mixup).
        reduction: "mean" over the scored targets, "sum", or "none" (one value per target, 0 where ignored).
        label_smoothing: ε; the target distribution becomes (1 − ε)·target + ε/C.
    """
    logits = logits.float().flatten(0, -2)
    if targets.is_floating_point():
        targets = targets.float().flatten(0, -2)
    else:
        targets = targets.long().flatten()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction,
                           label_smoothing=label_smoothing)


__all__ = ["IGNORE_INDEX", "cross_entropy"]
