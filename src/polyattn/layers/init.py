"""Weight initialisation shared by the models."""

from torch import nn


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights (std 0.02, as ViT/DeiT and LLaMA-style models) and zero biases for nn.Linear;
    other modules are left as they are. Use with `model.apply(init_linear)`."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
