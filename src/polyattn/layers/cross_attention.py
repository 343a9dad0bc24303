"""Cross-attention: queries from `x`, keys and values from a context (condition tokens, image patches, a prefix).

- `LinearCrossAttention`: kernelized cross-attention (arXiv 2006.16236). `encode_context` summarises the context
  into the fixed-size state `Σ φ(k) vᵀ`, `Σ φ(k)` (`polyattn.ops.linear_cross_attention`), so the cost per query
  does not grow with the context length, and the state is computed once and reused.
- `CrossAttentionBlock`: `x + Attn(Norm(x), Norm_c(context))`, then `x + MLP(Norm(x))`, with the attention class
  passed in: `Attention` (softmax; the context's keys/values, a `KVCache`, are what is reused) or
  `LinearCrossAttention` (the linear state). `encode_context` returns what a later call takes as `context=`, so a
  sampler or a decoder projects a context once for all its steps.

Both attention classes take `(x, *, context, key_padding_mask) -> (o, context_state)` and
`encode_context(context, *, key_padding_mask)`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.checks import check_features
from ..ops.linear_cross_attention import LinearContextState, linear_context_state, linear_cross_attn
from .attention import Attention, KVCache
from .drop import DropPath
from .init import init_linear
from .mlp import Mlp


class LinearCrossAttention(nn.Module):
    """Linear cross-attention with the `elu + 1` feature map (module docstring); `Attention`'s projections.

    Args:
        dim (int): width `D` of `x` and of the output.
        num_heads (int): heads `H`; head dim `D / H`.
        context_dim (int, Optional): width of the context. Default: `dim`.
        qkv_bias (bool): biases on the q/k/v projections. Default: False.
        proj_bias (bool): bias on `o_proj`. Default: True.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, qkv_bias: bool = False,
                 proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) is not divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        kv_in = context_dim or dim
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_in, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_in, dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim, bias=proj_bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_linear(proj)

    def encode_context(self, context: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None
                       ) -> LinearContextState:
        """The state of `context [B, S, context_dim]` (`key_padding_mask [B, S]`, True = real)."""
        k = self.k_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, H, D)
        v = self.v_proj(context).unflatten(-1, (self.num_heads, self.head_dim))
        return linear_context_state(k, v, key_padding_mask)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | LinearContextState,
                key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LinearContextState]:
        """`x [B, T, dim]` attends to `context` (a tensor, or its state from `encode_context`) → `([B, T, dim],
        state)`."""
        check_features("LinearCrossAttention", x, self.q_proj.in_features)
        if isinstance(context, LinearContextState):
            if key_padding_mask is not None:
                raise ValueError("an encoded context already holds its padding; do not pass key_padding_mask")
            state = context
        else:
            state = self.encode_context(context, key_padding_mask=key_padding_mask)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, H, D)
        return self.o_proj(linear_cross_attn(q, state).flatten(2)), state


ContextState = KVCache | LinearContextState
"""What `CrossAttentionBlock.encode_context` returns: the context's keys/values (softmax) or its linear state."""


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: `x + DropPath(Attn(Norm_q(x), Norm_c(context)))`, then
    `x + DropPath(MLP(Norm(x)))` (module docstring).

    Args:
        dim (int): width of `x`.
        num_heads (int): attention heads.
        context_dim (int, Optional): width of the context. Default: `dim`.
        attn_layer (type): `Attention` (softmax) or `LinearCrossAttention`. Default: `Attention`.
        mlp_ratio (float): MLP hidden width over `dim`. Default: 4.0.
        qkv_bias (bool): biases on the q/k/v projections. Default: False.
        norm_layer (type): the norm of `x` and of the context. Default: `nn.LayerNorm`.
        drop_path (float): stochastic depth of both branches. Default: 0.0.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None,
                 attn_layer: type[Attention] | type[LinearCrossAttention] = Attention, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, norm_layer: type[nn.Module] = nn.LayerNorm, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm_context = norm_layer(context_dim or dim)
        self.attn = attn_layer(dim, num_heads, context_dim=context_dim, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path)

    def encode_context(self, context: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None
                       ) -> ContextState:
        """The context `[B, S, context_dim]` projected once (`key_padding_mask [B, S]`, True = real), to pass as
        `context=` to any number of later calls."""
        return self.attn.encode_context(self.norm_context(context), key_padding_mask=key_padding_mask)

    def forward(self, x: torch.Tensor, context: torch.Tensor | ContextState, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, T, dim]` attends to `context` (`[B, S, context_dim]` with `key_padding_mask`, or the result of
        `encode_context`) → `[B, T, dim]`."""
        if isinstance(context, torch.Tensor):
            context = self.encode_context(context, key_padding_mask=key_padding_mask)
        elif key_padding_mask is not None:
            raise ValueError("an encoded context already holds its padding; do not pass key_padding_mask")
        y, _ = self.attn(self.norm1(x), context=context)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


__all__ = ["ContextState", "CrossAttentionBlock", "LinearCrossAttention"]
