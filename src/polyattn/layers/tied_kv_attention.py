"""Tied K=V attention: the attention of the authors' code for arXiv 2412.06106 (MetaMain/ECPTransformer), the
faithful mode of the Perceiver family (spec `perceiver_ar_and_llp.md` §2.9).

One projection serves as keys and values (`to_kv`); RoPE rotates q and K=V, so the values carry absolute positions,
and a per-head LayerNorm then normalises the rotated K=V (the authors' order: rotate, then normalise). The call
signature is `Attention`'s, so `TransformerBlock` takes either.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import attention, padding_to_attn_mask
from .attention import KVCache
from .rope import Rotary


class TiedKVAttention(nn.Module):
    """The attention of the authors' code for arXiv 2412.06106 (faithful mode, §2.9).

    One bias-free projection `kv_proj` (the code's `to_kv = Linear(D, D)`) serves as keys *and* values; RoPE, when
    passed, rotates the queries and K=V, so the values are rotated too; then a per-head LayerNorm over the head
    channels normalises the rotated K=V (`apply_kv_norm=False` keeps the norm's parameters but skips it, as in
    `ECPAttentionTransformer.py`). The order is the authors' in every file of their code: the norm sees rotated
    vectors, so its mean subtraction and per-channel affine do not commute with the rotation, and the scores are not
    a function of relative positions alone (in the clean `Attention` they are). `o_proj` has a bias; with
    `first_segment_out`, the rows flagged by `first_rows` (ECP's segment 0) use their own output projection
    `o_proj_first` (the code's `to_out_0`).

    The call signature is `Attention`'s (self-attention when `context` is None, otherwise keys/values from a context
    tensor or from `encode_context`), so `TransformerBlock` and the models use either. No KV cache: the faithful
    models decode by recomputing their window.
    """

    def __init__(self, dim: int, num_heads: int, *, apply_kv_norm: bool = True, first_segment_out: bool = False,
                 attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.apply_kv_norm, self.attn_drop = apply_kv_norm, attn_drop
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, dim, bias=False)
        self.kv_norm = nn.LayerNorm(self.head_dim)
        self.o_proj = nn.Linear(dim, dim)
        self.o_proj_first = nn.Linear(dim, dim) if first_segment_out else None

    def encode_context(self, context: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                       rope: Rotary | None = None) -> KVCache:
        """K = V of `context [B, S, D]` as a `KVCache` (keys and values are the same tensor)."""
        kv = self.kv_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, H, Dh)
        if rope is not None:  # before the norm, as the authors' code does (LayerNorm does not commute with it)
            kv = rope.apply(kv)
        if self.apply_kv_norm:
            kv = self.kv_norm(kv)
        return KVCache(kv, kv, key_padding_mask, context.shape[1])

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | KVCache | None = None, rope: Rotary | None = None,
                context_rope: Rotary | None = None, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, first_rows: torch.Tensor | None = None,
                cache: KVCache | None = None, use_cache: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        """`x [B, T, D]` → `[B, T, D]`; `first_rows [B, T]` bool picks `o_proj_first` (with `first_segment_out`)."""
        if cache is not None:
            raise ValueError("TiedKVAttention keeps no KV cache: the faithful models decode by recomputing")
        if context is None:
            ctx = self.encode_context(x, key_padding_mask=key_padding_mask, rope=rope)
        elif isinstance(context, KVCache):
            ctx = context
        else:
            ctx = self.encode_context(context, key_padding_mask=key_padding_mask, rope=context_rope)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, H, Dh)
        if rope is not None:
            q = rope.apply(q)
        mask = attn_mask
        if ctx.key_padding_mask is not None:
            pad = padding_to_attn_mask(ctx.key_padding_mask)
            mask = pad if mask is None else mask & pad
        o = attention(q, ctx.k, ctx.v, attn_mask=mask,
                      dropout_p=self.attn_drop if self.training else 0.0).flatten(2)  # (B, T, D)
        out = self.o_proj(o)
        if self.o_proj_first is not None and first_rows is not None:
            out = torch.where(first_rows[..., None], self.o_proj_first(o), out)
        return out, (ctx if use_cache else None)


__all__ = ["TiedKVAttention"]
