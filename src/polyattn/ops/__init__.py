"""Pure tensor functions: the math of each token mixer, `[B, T, H, D]` layout, each with a reference form."""

from .attention import MaskMode, attention
from .lightnet import lightnet_attn

__all__ = ["MaskMode", "attention", "lightnet_attn"]
