"""timm's classifier-head contract and per-input early exit, shared by the image classifiers."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.early_exit import EarlyExitOutput, check_exit_threshold, run_blocks_all_exits, run_blocks_early_exit
from ..layers.init import init_linear
from ..layers.reversible import run_blocks


class LinearHeadMixin:
    """`get_classifier` and `reset_classifier` for a model whose head is one `nn.Linear` named `head` on
    `num_features` channels. `GLOBAL_POOLS` lists the pooling modes the model's `forward_head` implements."""

    GLOBAL_POOLS: tuple[str, ...] = ()
    head: nn.Module
    num_features: int
    num_classes: int
    global_pool: str

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A freshly initialised head for `num_classes` (0 gives an identity, for features), and optionally
        another pooling mode."""
        if global_pool is not None:
            if global_pool not in self.GLOBAL_POOLS:
                raise ValueError(f"{type(self).__name__} pools with {' or '.join(map(repr, self.GLOBAL_POOLS))}, "
                                 f"got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_linear(self.head)


class EarlyExitMixin:
    """Per-input early exit for a classifier built on a block stack (`polyattn.layers.early_exit`).

    A model that takes part builds `self._init_early_exit(...)` after its blocks, head and final norm, implements
    `_tokens(x, **inputs) -> (tokens [B, T, D], block keyword arguments)` (what comes before the blocks), and
    routes its `forward` through `_forward(x, all_exits, **inputs)`. The exit after block `i` is the model's own
    `forward_head` on `exit_norms[i](tokens)`: one shared head, a norm per exit (the last exit's norm is the
    model's final `norm`, so the last exit is the model's ordinary output).
    """

    blocks: nn.ModuleList
    norm: nn.Module
    early_exit: bool
    exit_threshold: float
    reversible: bool

    def _init_early_exit(self, early_exit: bool, exit_threshold: float, norm_layer, dim: int, *,
                         reversible: bool) -> None:
        if early_exit and reversible:
            raise ValueError("early_exit reads every block's output, which a reversible stack does not keep (its "
                             "two streams are fused only at the end); set reversible=False or early_exit=False")
        self.early_exit = early_exit
        self.exit_threshold = check_exit_threshold(exit_threshold)
        # the exits before the last one; the last exit uses the model's final norm
        self.exit_norms = (nn.ModuleList(norm_layer(dim) for _ in range(len(self.blocks) - 1)) if early_exit
                           else None)

    def exit_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens after block `i` `[B, T, D]` → the logits of exit `i` `[B, C]` (the shared head)."""
        norm = self.norm if i == len(self.blocks) - 1 else self.exit_norms[i]
        return self.forward_head(norm(x))

    def _check_early_exit(self) -> None:
        if not self.early_exit:
            raise ValueError(f"this {type(self).__name__} was built without exits; build it with early_exit=True")

    def forward_exits(self, x: torch.Tensor, **inputs) -> list[torch.Tensor]:
        """Images → the logits `[B, C]` of every exit, first block's first (the deep-supervision loss's inputs)."""
        self._check_early_exit()
        tokens, kwargs = self._tokens(x, **inputs)
        return run_blocks_all_exits(self.blocks, tokens, self.exit_logits, **kwargs)

    def forward_early_exit(self, x: torch.Tensor, threshold: float | None = None, **inputs) -> EarlyExitOutput:
        """Images → each input's logits from the first exit more confident than `threshold` (None: the model's
        `exit_threshold`), and the number of blocks it ran; exited inputs leave the batch (real saved time)."""
        self._check_early_exit()
        tokens, kwargs = self._tokens(x, **inputs)
        threshold = self.exit_threshold if threshold is None else threshold
        return run_blocks_early_exit(self.blocks, tokens, self.exit_logits, threshold, **kwargs)

    def _features(self, tokens: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The block stack (reversible or not) and the final norm: `forward_features` after `_tokens`."""
        return self.norm(run_blocks(self.blocks, tokens, reversible=self.reversible, **kwargs))

    def _forward(self, x: torch.Tensor, all_exits: bool, **inputs) -> torch.Tensor:
        """The forward of every model with the mixin: `[E, B, C]` of all exits with `all_exits` (training), the
        per-input early exit in eval mode when the threshold can exit, else the full model `[B, C]`."""
        if all_exits:
            return torch.stack(self.forward_exits(x, **inputs))
        if self.early_exit and not self.training and self.exit_threshold < 1.0:
            return self.forward_early_exit(x, **inputs).logits
        tokens, kwargs = self._tokens(x, **inputs)
        return self.forward_head(self._features(tokens, kwargs))
