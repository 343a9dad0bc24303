"""The pre-norm transformer block shared by the softmax models (ViT, iLLaMA, LLaMA-style LM, BERT, DiT)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import KVCache
from .drop import DropPath


class TransformerBlock(nn.Module):
    """`x + DropPath(Attn(Norm(x)))`, then `x + DropPath(MLP(Norm(x)))`.

    Structure is injected: `attn` (an already built token mixer, any `polyattn.layers.mixer` mixer), `norm_layer`
    (LayerNorm, RMSNorm, ...) and `mlp` (an already built channel mixer), so ViT (LayerNorm + GELU MLP) and
    LLaMA-style models (RMSNorm + SwiGLU) share this one block.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, norm_layer: type[nn.Module],
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, use_cache: bool = False,
                **attn_kwargs) -> tuple[torch.Tensor, KVCache | None]:
        """x: `[B, T, D]`; `attn_kwargs` go to the token mixer (its common `key_padding_mask`, `grid_shape`, and a
        softmax `Attention`'s own `rope`, `attn_mask`, `soft_mask_a`, `context`)."""
        y, cache = self.attn(self.norm1(x), cache=cache, use_cache=use_cache, **attn_kwargs)
        x = x + self.drop_path(y)
        x = x + self.mlp_branch(x)
        return x, cache

    def mixer_branch(self, x: torch.Tensor, **attn_kwargs) -> tuple[torch.Tensor, KVCache | None]:
        """`(DropPath(Attn(Norm(x))), the attention's cache)`: the first residual branch, for a reversible stack
        (`polyattn.layers.reversible`); `attn_kwargs` as `forward`'s, `cache` and `use_cache` included."""
        y, cache = self.attn(self.norm1(x), **attn_kwargs)
        return self.drop_path(y), cache

    def mlp_branch(self, x: torch.Tensor, **_) -> torch.Tensor:
        """`DropPath(MLP(Norm(x)))`, the second residual branch; the MLP takes none of the mixer's options."""
        return self.drop_path(self.mlp(self.norm2(x)))
