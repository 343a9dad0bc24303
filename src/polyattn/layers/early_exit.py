"""Per-input early exit from a stack of blocks: an exit after every block, taken when the exit is confident.

Internal classifiers after every block with a confidence-threshold exit at inference, as in Shallow-Deep Networks
(Kaya et al., arXiv 1810.07052: an input leaves at the first internal classifier whose maximum softmax
probability exceeds the threshold q). Unlike SDN's separate classifiers, the exits share one head (the model's
own pooling and linear head); each exit has its own norm in front of it (the last exit's is the model's final
norm, so the last exit *is* the model's ordinary output). The exits are trained jointly with the deep-supervision
loss of PABEE (Zhou et al., arXiv 2006.04152): the mean of the exits' losses weighted by their depth, computed
by the task (`polyattn.tasks.classification.ClassificationTask.exits_loss`).

At inference (`run_blocks_early_exit`) the inputs that have exited leave the batch: after each block the rows
still running are gathered, so the later blocks run on fewer rows and the saving is real time, not only counted
FLOPs. The exit rule is strict, `confidence > threshold`: a threshold of 1.0 never exits early (a softmax
probability is at most 1), so it gives exactly the full model; a threshold of 0 exits every input after the first
block.

The block keyword arguments must be the same for every row (RoPE angles over positions, a soft-mask value, a
grid shape): gathering rows does not gather them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ExitLogits = Callable[[int, torch.Tensor], torch.Tensor]
"""`exit_logits(i, tokens [B, T, D]) -> logits [B, C]`: the exit after block `i` (0-based)."""


@dataclass
class EarlyExitOutput:
    """What a per-input early-exit forward gives."""

    logits: torch.Tensor
    """`[B, C]`: the logits of the exit each input took."""
    exit_block: torch.Tensor
    """`[B]` int64: the number of blocks each input ran (1 = exited after the first block)."""


def check_exit_threshold(threshold: float) -> float:
    """The threshold as a float; outside [0, 1] (a softmax probability) it is an error."""
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"exit_threshold is a softmax probability in [0, 1] (1 = never exit early), got "
                         f"{threshold}")
    return threshold


def exit_confidence(logits: torch.Tensor) -> torch.Tensor:
    """`[B]`: the maximum softmax probability of logits `[B, C]`, in float32."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def run_blocks_all_exits(blocks: Sequence[nn.Module], x: torch.Tensor, exit_logits: ExitLogits,
                         **kwargs: Any) -> list[torch.Tensor]:
    """`x [B, T, D]` through every block, returning every exit's logits `[B, C]` (training and the reference)."""
    out = []
    for i, block in enumerate(blocks):
        x, _ = block(x, **kwargs)
        out.append(exit_logits(i, x))
    return out


def run_blocks_early_exit(blocks: Sequence[nn.Module], x: torch.Tensor, exit_logits: ExitLogits, threshold: float,
                          **kwargs: Any) -> EarlyExitOutput:
    """`x [B, T, D]` through the blocks until each input's exit is confident (`confidence > threshold`; the last
    exit always takes the rest). Inputs that exited are dropped from the batch before the next block runs."""
    threshold = check_exit_threshold(threshold)
    B = x.shape[0]
    rows = torch.arange(B, device=x.device)  # the original index of each row still running
    exit_block = torch.zeros(B, dtype=torch.long, device=x.device)
    logits = None
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        x, _ = block(x, **kwargs)
        z = exit_logits(i, x)  # (b, C) for the b rows still running
        if logits is None:
            logits = z.new_empty(B, z.shape[-1])
        done = torch.ones_like(rows, dtype=torch.bool) if i == last else exit_confidence(z) > threshold
        logits[rows[done]] = z[done]
        exit_block[rows[done]] = i + 1
        running = ~done
        if not bool(running.any()):
            break
        x, rows = x[running], rows[running]  # the later blocks compute only the rows that have not exited
    if logits is None:
        raise ValueError("early exit needs at least one block")
    return EarlyExitOutput(logits, exit_block)


__all__ = ["EarlyExitOutput", "check_exit_threshold", "exit_confidence", "run_blocks_all_exits",
           "run_blocks_early_exit"]
