"""Multi-head softmax attention (self and cross) with grouped kv heads, RoPE, padding masks and a KV cache.

The cache is explicit: `forward` takes a `KVCache` and returns the updated one, and nothing in the module
changes during forward (flash-linear-attention's layer contract, without a global cache object).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError, parse_enum
from ..ops.attention import MaskMode, attention, padding_to_attn_mask
from ..ops.checks import check_features
from ..ops.sequence import cat_padding_masks, real_positions
from .init import init_linear
from .mixer_hooks import call_op
from .rope import Rotary


@dataclass
class KVCache:
    """The keys and values one attention layer has seen, for decoding token by token.

    Keys are stored after RoPE, so cached entries never need re-rotating. Each layer owns its cache and its
    counter; positions are never derived from a global counter (flash-linear-attention #747, #766).

    Attributes:
        k (Tensor): keys `[B, S, Hkv, D]`.
        v (Tensor): values `[B, S, Hkv, Dv]`.
        key_padding_mask (Tensor, Optional): `[B, S]` bool, True = real token (left-padded prompts). None means
            every slot is real.
        offset (int): number of positions appended so far (equals `S` for this unbounded cache).
    """

    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None = None
    offset: int = 0

    @classmethod
    def empty(cls, batch_size: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None, *,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A cache with no entries yet."""
        k = torch.zeros(batch_size, 0, num_kv_heads, head_dim, device=device, dtype=dtype)
        v = torch.zeros(batch_size, 0, num_kv_heads, v_head_dim or head_dim, device=device, dtype=dtype)
        return cls(k, v, None, 0)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor,
               key_padding_mask_new: torch.Tensor | None = None) -> KVCache:
        """A new cache with `k_new` `[B, T, Hkv, D]`, `v_new` `[B, T, Hkv, Dv]` appended; `self` is unchanged.

        Args:
            key_padding_mask_new (Tensor, Optional): `[B, T]` bool for the new slots; None = all real.
        """
        mask = cat_padding_masks(self.key_padding_mask, key_padding_mask_new, self.k.shape[:2], k_new.shape[:2],
                                 self.k.device)
        return KVCache(torch.cat((self.k, k_new), dim=1), torch.cat((self.v, v_new), dim=1), mask,
                       self.offset + k_new.shape[1])

    def next_positions(self, num_new: int = 1) -> torch.Tensor:
        """Positions of `num_new` real tokens appended next: `[num_new]`, or `[B, num_new]` per row when the
        cache has a padding mask (each row continues from its own count of real tokens)."""
        start = self.offset if self.key_padding_mask is None else self.key_padding_mask.sum(-1)
        return real_positions(None, num_new, start=start, device=self.k.device)


def parse_mask_mode(mask_mode: MaskMode | str) -> MaskMode:
    """`MaskMode` from the enum or its string value, with a clear error for anything else."""
    return parse_enum(MaskMode, mask_mode, "mask_mode")


class Attention(nn.Module):
    """Multi-head softmax attention (arXiv 1706.03762) with grouped kv heads (arXiv 2305.13245).

    Self-attention when `context` is None, cross-attention otherwise (keys and values from `context`).
    All masks are options of one operator, see `polyattn.ops.attention` (`BIDIRECTIONAL`, `CAUSAL`,
    `ILLAMA_SOFT`, `SOFT_CAUSAL`).

    With `dim = D`, `head_dim = D / num_heads`, `num_kv_heads = num_heads` and both biases the layer has exactly
    `4D² + 4D` parameters (the ViT/iLLaMA count).

    A token mixer (`polyattn.layers.mixer`): `Attention.build(dim, num_heads, causal=...)` sets `mask_mode`, and
    its call form `(x, *, key_padding_mask, cache, use_cache, grid_shape) -> (o, cache)` is the one every mixer
    follows; `rope`, `context`, `attn_mask` and `soft_mask_a` are softmax attention's own call arguments.

    Args:
        dim (int): model width `D` of `x` and of the output.
        num_heads (int): query heads `H`.
        num_kv_heads (int, Optional): key/value heads `Hkv`, a divisor of `H`. Default: `H`.
        head_dim (int, Optional): channels per head. Default: `dim // num_heads`.
        context_dim (int, Optional): width of the cross-attention context. Default: `dim`.
        qkv_bias (bool): biases on `q_proj`, `k_proj`, `v_proj`. Default: False.
        proj_bias (bool): bias on `o_proj`. Default: True.
        mask_mode (MaskMode | str): the mask operator. Default: `BIDIRECTIONAL`.
        attn_drop (float): dropout on the attention weights (training only). Default: 0.0.
        proj_drop (float): dropout on the output. Default: 0.0.
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 context_dim: int | None = None, qkv_bias: bool = False, proj_bias: bool = True,
                 mask_mode: MaskMode | str = MaskMode.BIDIRECTIONAL, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) is not divisible by num_heads ({num_heads}); pass head_dim")
            head_dim = dim // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mask_mode = parse_mask_mode(mask_mode)
        self.attn_drop = attn_drop
        factory = {"device": device, "dtype": dtype}
        kv_in = context_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(kv_in, num_kv_heads * head_dim, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(kv_in, num_kv_heads * head_dim, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    BUILD_ARGS: ClassVar[tuple[str, ...]] = ("mask_mode",)
    """Constructor arguments that `build` sets from its own (`causal`), so a model's options may not set them."""

    @classmethod
    def build(cls, dim: int, num_heads: int, *, causal: bool, grid_shape: Sequence[int] | None = None,
              **options) -> Attention:
        """The token-mixer constructor (`polyattn.layers.mixer`): `CAUSAL` or `BIDIRECTIONAL` masks; `grid_shape`
        is not needed (positions come from `rope` or an absolute table)."""
        mask_mode = MaskMode.CAUSAL if causal else MaskMode.BIDIRECTIONAL
        return cls(dim, num_heads, mask_mode=mask_mode, **options)

    @property
    def causal(self) -> bool:
        """True when no output depends on a later token, so that decoding with a cache reproduces the forward."""
        return self.mask_mode is MaskMode.CAUSAL

    def reset_parameters(self) -> None:
        """Trunc-normal (std 0.02) weights and zero biases (ViT, iLLaMA).

        The cut-off is at ±2 absolute, as in timm's `trunc_normal_(std=.02)` that those models use: 100σ, so in
        practice a plain normal.
        """
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_linear(proj)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim))  # (B, T, heads, head_dim)

    def encode_context(self, context: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                       rope: Rotary | None = None) -> KVCache:
        """Projects a cross-attention context once, so that it can be passed as `context=` to later calls.

        Args:
            context (Tensor): `[B, S, context_dim]`.
            key_padding_mask (Tensor, Optional): `[B, S]` bool, True = real token.
            rope (Rotary, Optional): rotation for the context positions, applied to the keys.

        Returns:
            KVCache: keys `[B, S, Hkv, D]` and values `[B, S, Hkv, D]` of the context.
        """
        k = self._heads(self.k_proj(context), self.num_kv_heads)
        v = self._heads(self.v_proj(context), self.num_kv_heads)
        if rope is not None:
            k = rope.apply(k)
        return KVCache(k, v, key_padding_mask, context.shape[1])

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | KVCache | None = None,
        rope: Rotary | None = None,
        context_rope: Rotary | None = None,
        soft_mask_a: float | torch.Tensor = 0.0,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        grid_shape: Sequence[int] | None = None,
        block_sparse: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Attends from `x` to itself (and its cache) or to `context`.

        Args:
            x (Tensor): `[B, T, dim]`, the current tokens.
            context (Tensor | KVCache, Optional): cross-attention source `[B, S, context_dim]`, or its keys and
                values from `encode_context` (or a previous call with `use_cache=True`), which skips
                re-projecting it. None = self-attention.
            rope (Rotary, Optional): rotation for the positions of the current tokens (from `RotaryEmbedding`
                or `RotaryEmbeddingND`). Applied to the queries and, in self-attention, to the new keys before
                they enter the cache.
            context_rope (Rotary, Optional): rotation for the context positions, applied to the context keys
                (cross-attention only; not applied unless passed).
            soft_mask_a (float | Tensor): `a` for the `ILLAMA_SOFT` and `SOFT_CAUSAL` modes. Default: 0.0.
            key_padding_mask (Tensor, Optional): `[B, S_new]` bool, True = real token, for the new keys: those of
                `x` in self-attention (appended to the cache's mask), those of a context tensor in
                cross-attention (a cached context carries its own).
            attn_mask (Tensor, Optional): extra boolean mask broadcastable to `[B, H, T, S]` over all keys
                (cache included), True = may attend.
            cache (KVCache, Optional): self-attention cache from a previous call; the new keys/values are
                appended and the queries sit at the end (causal masks are bottom-right aligned).
            use_cache (bool): return the updated self-attention cache (or the context's keys/values in
                cross-attention) even when no cache was passed. Default: False.
            grid_shape (Sequence[int], Optional): the grid the tokens lie on, which every token mixer is handed
                (the common call form); softmax attention does not need it, since its positions come from
                `rope` or from an absolute table added before the block.
            block_sparse (Callable, Optional): an op that computes a block-sparse pattern block by block over whole
                sequences at positions 0 … T − 1, called as `op(q, k, v, mask_mode=, dropout_p=)`: e.g.
                `partial(shifted_group_attention, group_size=G)` (LongLoRA's S²-Attn) or
                `partial(segment_pair_attention, segment_len=m)` (LLP) from `polyattn.ops.attention`. Only for
                self-attention without a cache, padding or `attn_mask`; the pattern's mask form as `attn_mask`
                covers those.

        Returns:
            tuple[Tensor, KVCache | None]: output `[B, T, dim]` and the cache (None unless `cache` was passed or
            `use_cache` is set).
        """
        check_features("Attention", x, self.q_proj.in_features)
        q = self._heads(self.q_proj(x), self.num_heads)  # (B, T, H, D)
        if rope is not None:
            q = rope.apply(q)
        new_cache = None
        if context is None:
            k = self._heads(self.k_proj(x), self.num_kv_heads)  # (B, T, Hkv, D)
            v = self._heads(self.v_proj(x), self.num_kv_heads)
            if rope is not None:
                k = rope.apply(k)
            if cache is not None or use_cache:
                if self.mask_mode is MaskMode.ILLAMA_SOFT:
                    raise UserError("A KV cache cannot be used with mask_mode 'illama_soft': its outputs depend on "
                                    "later tokens, so token-by-token decoding does not reproduce them. Use "
                                    "'causal' (or 'soft_causal' with a = 0) for decoding.")
                if cache is None:
                    new_cache = KVCache(k, v, key_padding_mask, x.shape[1])
                else:
                    new_cache = cache.append(k, v, key_padding_mask)
                k, v, key_padding_mask = new_cache.k, new_cache.v, new_cache.key_padding_mask
        else:
            if cache is not None:
                raise ValueError("cross-attention takes its keys and values from `context`; pass a cached context "
                                 "as `context=` (see encode_context), not as `cache=`")
            if isinstance(context, KVCache):
                if key_padding_mask is not None or context_rope is not None:
                    raise ValueError("a cached context already holds its padding mask and rotated keys; do not "
                                     "pass key_padding_mask or context_rope with it")
                ctx = context
            else:
                ctx = self.encode_context(context, key_padding_mask=key_padding_mask, rope=context_rope)
            k, v, key_padding_mask = ctx.k, ctx.v, ctx.key_padding_mask
            new_cache = ctx if use_cache else None

        if block_sparse is not None:
            if context is not None or new_cache is not None or key_padding_mask is not None or attn_mask is not None:
                raise ValueError("block_sparse attends over whole sequences: self-attention without a cache, "
                                 "key_padding_mask or attn_mask (pass the pattern's mask as attn_mask for those)")
            o = call_op(self, block_sparse, q, k, v, mask_mode=self.mask_mode,
                        dropout_p=self.attn_drop if self.training else 0.0)
            return self.proj_drop(self.o_proj(o.flatten(2))), None
        mask = attn_mask
        if key_padding_mask is not None:
            pad = padding_to_attn_mask(key_padding_mask)  # (B, 1, 1, S)
            mask = pad if mask is None else mask & pad
        o = call_op(self, attention, q, k, v, mask_mode=self.mask_mode, soft_mask_a=soft_mask_a, attn_mask=mask,
                    dropout_p=self.attn_drop if self.training else 0.0)  # (B, T, H, D)
        return self.proj_drop(self.o_proj(o.flatten(2))), new_cache

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"mask_mode={self.mask_mode.value}")
