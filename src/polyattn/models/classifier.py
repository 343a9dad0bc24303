"""timm's classifier-head contract, shared by the image classifiers."""

from __future__ import annotations

from torch import nn

from ..layers.init import init_linear


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
