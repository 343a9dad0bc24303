"""Perceiver AR (arXiv 2202.07765, Hawthorne et al.), spec `reference/perceiver_ar_and_llp.md` §1.

A window of at most `n = max_seq_len` tokens ends in `N = num_latents` **latents** (its last N positions); the
positions before them are the **prefix**, `h = n − N` of them in a full window.

    tokens → embed ─┬─ queries: the last N embeddings
                    └─ keys/values: all n embeddings
    layer 0 (cross-attend): latents attend to the window, `u ≤ t` (bottom-right aligned), then the MLP
    layers 1… (latent stack): causal self-attention over the N latents only, then the MLP
    → norm → head: logits of the N latents, the only positions trained and scored

Latent `i` sits at window position `t = i + (n − N)`, so the cross-attend mask is `causal_mask(N, n)`, bottom-right
aligned (SDPA's `is_causal` is top-left aligned and would be wrong here). A sequence longer than n is read through
its last n tokens (older tokens drop out), in `forward` and in every cache alike. The blocks, the token I/O, the
clean and faithful modes and the window handling are the family's (`perceiver_family`); the row-stacking
variants of arXiv 2412.06106 are in `perceiver_variants`, LLP/ECP in `perceiver_llp`.

Not implemented from the official Perceiver AR (§1): the token-linear query init, separate query/key-value
LayerNorms in the cross-attend, squared-ReLU, rotary on a fraction of the channels, the z-loss (a task-level loss
term), zero-initialised logits, latent dropout. Cross-attend dropout (§1.5) is `cross_attn_dropout`.

Faithful mode (`faithful=True`, the baseline of the authors' code `PerceiverAR_baseline.py`, §2.4): tied K=V with a
per-head LayerNorm, RoPE on q and K=V in layer 0 only at positions counted from the window start, GELU feed-forward,
dropout 0.05 (`perceiver_family`).

Decoding (§1.7). Generation continues the sequence one token at a time; the reference (`use_cache=False`) runs
`forward` over the whole sequence each step, i.e. the last n tokens with the last N as latents — the exact mode of
the spec, which every cache here reproduces to float tolerance at every length:

- clean, `cache_mode="exact"` (`PerceiverARCache`): the cross-attention keys/values of the window are cached
  (they come from the embeddings, so they never go stale; the oldest drop out past n tokens), and so are the
  cross-attend outputs of the latents while the window start stays at 0 (T ≤ n) and the latent KV caches while
  every position is a latent (T ≤ N). What the sliding windows invalidate is recomputed: past N tokens the latent
  stack over the N latents (each latent's attention span starts at the oldest latent, which moves every step),
  past n tokens also the N cross-attend rows. So decoding costs O(1) rows per token up to N, then the latent stack.
- clean, `cache_mode="latent_kv"`: the official `fixed_size_kv` memory: each step adds one latent to the
  latent KV caches; when they hold N latents a fresh forward over the window with N/2 latents refills them. It
  equals the exact mode while T ≤ N and `forward(window, num_latents=N/2)` right after a refill; in between, the
  cached latents were computed under older splits (the mismatch the official code accepts). Not a default.
- faithful: `WindowCache`, the last n tokens, recomputed at every step (the faithful RoPE counts positions from the
  window start, so a sliding window re-rotates every key and value).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ..errors import UserError, nearest
from ..layers.attention import KVCache
from ..ops.attention import causal_mask
from ..ops.sequence import cat_padding_masks, real_counts, real_positions
from ..registry import register_model
from .perceiver_family import LatentPerceiver, WindowCache, attend, feed_forward, keep_last


class PerceiverCacheMode(str, Enum):
    """How clean Perceiver AR decodes: `EXACT` equals the uncached forward; `LATENT_KV` is the official
    fixed-size latent memory with refills (approximate past N tokens)."""

    EXACT = "exact"
    LATENT_KV = "latent_kv"


def parse_enum(enum_cls: type[Enum], value, name: str):
    """`enum_cls(value)` with a one-sentence error naming the valid values."""
    try:
        return enum_cls(value)
    except ValueError:
        valid = [m.value for m in enum_cls]
        raise UserError(f"Unknown {name} {value!r}; expected one of {valid}.{nearest(str(value), valid)}") from None


@dataclass
class PerceiverARCache:
    """The decoding state of clean Perceiver AR (see the module docstring).

    Attributes:
        cross (KVCache): keys/values of the cross-attend layer for the window's last ≤ n columns (keys rotated).
        queries (Tensor): `[B, ≤N, D]` the embeddings of the last ≤ N columns (the cross-attend queries' input).
        query_pos (Tensor): `[B, ≤N]` their RoPE positions.
        query_mask (Tensor, Optional): `[B, ≤N]` bool, True = real token.
        cross_out (Tensor): `[B, ≤N, D]` cross-attend layer outputs of those columns (exact mode; valid while the
            window start has not moved).
        latents (tuple[KVCache, ...]): one KV cache per latent layer; empty when the latent window has slid (exact
            mode recomputes the latent stack).
        latent_len (int): latents held by `latents`.
        columns (int): columns seen so far.
        seen (Tensor): `[B]` real tokens seen so far (the next RoPE position of each row).
    """

    cross: KVCache
    queries: torch.Tensor
    query_pos: torch.Tensor
    query_mask: torch.Tensor | None
    cross_out: torch.Tensor
    latents: tuple[KVCache, ...]
    latent_len: int
    columns: int
    seen: torch.Tensor


class PerceiverAR(LatentPerceiver):
    """Perceiver AR (module docstring): one cross-attend layer from the N latents to the window, then a causal
    latent stack.

    Args:
        vocab_size (int): token ids `V`. Default: 256 (byte-level).
        dim (int): width `D`. Default: 128.
        depth (int): blocks, the cross-attend layer included (the authors' count). Default: 4.
        num_heads (int): attention heads, in every layer. Default: 4.
        max_seq_len (int): the window `n`: the most tokens one forward reads. Default: 1024.
        num_latents (int): latents `N ≤ n`, the positions that are trained and scored. Default: 512.
        faithful (bool): reproduce the authors' baseline instead of the clean default (module docstring).
            Default: False.
        cache_mode (PerceiverCacheMode | str): decoding of the clean mode, "exact" or "latent_kv" (the faithful
            mode recomputes its window). Default: "exact".
        cross_attn_dropout (float): during training, the fraction of prefix positions removed from the cross-attend
            layer (Perceiver AR's encoder dropout, §1.5). Default: 0.0.
        dropout (float, Optional): dropout on attention weights and residual branches; None = 0.05 (faithful) or
            0.0 (clean).
        rope_base (float): RoPE frequency base. Default: 10000.0.
        norm_eps (float): RMSNorm epsilon (clean). Default: 1e-6.
        mlp_hidden_dim (int, Optional): SwiGLU width (clean); None = LLaMA's `8D/3` rounded up to 64.
        tie_embeddings (bool): the head reuses the embedding matrix (clean mode). Default: False.
    """

    def forward_blocks(self) -> list[torch.nn.Module]:
        """None: every layer is run through its parts (the cross-attend layer's keys are encoded apart from its
        queries, the latent layers continue caches), never by calling the block, so activation checkpointing and
        FSDP take the model whole (`polyattn.train.sharding.repeated_blocks`)."""
        return []

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 max_seq_len: int = 1024, num_latents: int = 512, faithful: bool = False,
                 cache_mode: PerceiverCacheMode | str = "exact", cross_attn_dropout: float = 0.0,
                 dropout: float | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6,
                 mlp_hidden_dim: int | None = None, tie_embeddings: bool = False):
        mode = parse_enum(PerceiverCacheMode, cache_mode, "cache_mode")
        if faithful and mode is not PerceiverCacheMode.EXACT:
            raise ValueError(f"cache_mode {mode.value!r} is an option of the clean mode; the faithful "
                             f"mode decodes by recomputing its window")
        if not 0.0 <= cross_attn_dropout < 1.0:
            raise ValueError(f"cross_attn_dropout must be in [0, 1), got {cross_attn_dropout}")
        super().__init__(vocab_size, dim, depth, num_heads, max_seq_len, num_latents, faithful=faithful,
                         dropout=dropout, rope_base=rope_base, norm_eps=norm_eps, mlp_hidden_dim=mlp_hidden_dim,
                         tie_embeddings=tie_embeddings)
        self.cache_mode, self.cross_attn_dropout = mode, cross_attn_dropout
        self.reset_parameters()

    # -- the cross-attend layer and the latent stack ----------------------------------------------------

    def _cross_attend(self, queries: torch.Tensor, query_pos: torch.Tensor, cross: KVCache,
                      num_latents: int) -> torch.Tensor:
        """Cross-attend layer (layer 0) for the last `R` window columns `queries [B, R, D]`: attention to
        the window's keys `u ≤ t` (bottom-right aligned), then the MLP."""
        R, W = queries.shape[1], cross.k.shape[1]
        allowed = causal_mask(R, W, queries.device)  # (R, W): query r sits at column W − R + r
        if self.training and self.cross_attn_dropout > 0:
            prefix = torch.arange(W, device=queries.device) < W - min(W, num_latents)
            drop = (torch.rand(queries.shape[0], W, device=queries.device) < self.cross_attn_dropout) & prefix
            allowed = allowed & ~drop[:, None, None, :]
        block = self.blocks[0]
        x = attend(block, queries, cross, rope=self._rotary(0, query_pos), attn_mask=allowed)
        return feed_forward(block, x)

    def _latent_stack(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                      caches: tuple[KVCache, ...] | None) -> tuple[torch.Tensor, tuple[KVCache, ...]]:
        """Causal self-attention layers 1… over latent rows `x [B, R, D]` that continue `caches` (None = new)."""
        new_caches = []
        for i, block in enumerate(self.blocks[1:], start=1):
            rope = self._rotary(i, positions)
            kv = block.attn.encode_context(block.norm1(x), key_padding_mask=mask, rope=rope)
            if caches is not None:
                kv = caches[i - 1].append(kv.k, kv.v, kv.key_padding_mask)
            x = attend(block, x, kv, rope=rope, attn_mask=causal_mask(x.shape[1], kv.k.shape[1], x.device))
            x = feed_forward(block, x)
            new_caches.append(kv)
        return x, tuple(new_caches)

    def _ar(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
            cache: PerceiverARCache | None, num_latents: int, columns: int,
            seen: torch.Tensor | None = None) -> tuple[torch.Tensor, PerceiverARCache]:
        """Perceiver AR over new window columns (`tokens [B, T]`, T ≤ n), continuing `cache`.

        `columns` counts the columns of the sequence after this call (more than T when a cache is continued or
        older tokens were cut), `seen [B]` its real tokens. Returns the latent outputs of the new columns
        `[B, min(T, L), D]` and the new cache. With `cache=None` this is the plain forward of the window (module
        docstring: what is cached and what is recomputed).
        """
        N, n, (B, T) = num_latents, self.max_seq_len, tokens.shape
        block0 = self.blocks[0]
        x = self.io.embed_tokens(tokens)  # (B, T, D)
        kv = block0.attn.encode_context(block0.norm1(x), key_padding_mask=mask, rope=self._rotary(0, positions))
        if cache is None:
            cross, queries, query_pos, query_mask = kv, x, positions, mask
        else:
            cross = cache.cross.append(kv.k, kv.v, kv.key_padding_mask)
            query_mask = cat_padding_masks(cache.query_mask, mask, cache.queries.shape[:2], (B, T), x.device)
            queries = torch.cat((cache.queries, x), 1)
            query_pos = torch.cat((cache.query_pos, positions), 1)
        cross = keep_last(cross, n)
        queries, query_pos = queries[:, -N:], query_pos[:, -N:]
        query_mask = None if query_mask is None else query_mask[:, -N:]
        L = queries.shape[1]  # latents of the current window
        new = min(T, L)  # new columns that are latents

        last = lambda t, k: None if t is None else t[:, -k:]
        exact = self.cache_mode is PerceiverCacheMode.EXACT
        if cache is None or (exact and columns > n):  # a fresh window, or its start moved: every latent row
            cross_out = self._cross_attend(queries, query_pos, cross, N)
        else:  # the window start is still 0 (or the latent_kv mode ignores its moves): the new rows only
            rows = self._cross_attend(queries[:, -new:], query_pos[:, -new:], cross, N)
            cross_out = torch.cat((cache.cross_out, rows), 1)[:, -N:]

        if cache is None:
            out, latents = self._latent_stack(cross_out, query_pos, query_mask, None)
        elif exact and columns > N:  # the oldest latent moved: recompute the latent stack, keep no latent cache
            out, latents = self._latent_stack(cross_out, query_pos, query_mask, None)
            latents = ()
        elif exact or cache.latent_len + new <= N:  # every position still a latent, or room in the fixed memory
            out, latents = self._latent_stack(cross_out[:, -new:], query_pos[:, -new:], last(query_mask, new),
                                              cache.latents)
        else:  # latent_kv memory full: refill with a fresh forward over the window's last max(N/2, new) latents
            R = max(N // 2, new)
            cross_out = self._cross_attend(queries[:, -R:], query_pos[:, -R:], cross, N)
            out, latents = self._latent_stack(cross_out, query_pos[:, -R:], last(query_mask, R), None)
        latent_len = latents[0].k.shape[1] if latents else 0  # no latent layers: no memory to refill
        seen = real_counts(mask, T, batch_size=B, device=x.device) if seen is None else seen
        new_cache = PerceiverARCache(cross, queries, query_pos, query_mask, cross_out, latents, latent_len, columns,
                                     seen)
        return out[:, -new:], new_cache

    def _trunk(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
               num_latents: int) -> torch.Tensor:
        """The latent rows `[B, L, D]` of one window."""
        return self._ar(tokens, mask, positions, None, num_latents, tokens.shape[1])[0]

    def forward_cached(self, tokens: torch.Tensor, cache: PerceiverARCache | WindowCache | None = None, *,
                       attention_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, PerceiverARCache | WindowCache]:
        """Continues `cache` (None = a new sequence) with `tokens [B, T]`: the logits of the new tokens that are
        latents of the current window, `[B, min(T, N), V]` — what `forward` over the whole sequence gives for
        them — and the new cache (`PerceiverARCache` in the clean mode, `WindowCache` in the faithful one).

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool for the new tokens (left-padded prompts).
        """
        if self.faithful:
            return super().forward_cached(tokens, cache, attention_mask=attention_mask)
        n, (B, T) = self.max_seq_len, tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else cache.seen
        positions = real_positions(mask, T, start=start, batch_size=B, device=tokens.device)
        seen = real_counts(mask, T, batch_size=B, device=tokens.device) + start
        columns = T + (0 if cache is None else cache.columns)
        if tokens.shape[1] > n:  # the window is new tokens only: nothing cached is still needed
            tokens, positions, cache = tokens[:, -n:], positions[:, -n:], None
            mask = None if mask is None else mask[:, -n:]
        out, new_cache = self._ar(tokens, mask, positions, cache, self.num_latents, columns, seen)
        return self.io.logits(out), new_cache


@register_model(PerceiverAR, task="causal_lm")
def perceiver_ar_nano():
    """Perceiver AR (arXiv 2202.07765): D 128, 1 cross-attend + 3 latent layers, 4 heads, window 1024, 512 latents."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512)


@register_model(PerceiverAR, task="causal_lm")
def perceiver_ar_tiny():
    """Perceiver AR, D 256, 6 layers, 4 heads, window 1024, 512 latents."""
    return dict(dim=256, depth=6, num_heads=4, max_seq_len=1024, num_latents=512)


@register_model(PerceiverAR, task="causal_lm")
def perceiver_ar_small():
    """Perceiver AR, D 768, 12 layers, 12 heads, window 2048, 1024 latents (the arXiv 2412.06106 baseline shape)."""
    return dict(dim=768, depth=12, num_heads=12, max_seq_len=2048, num_latents=1024)


__all__ = ["PerceiverAR", "PerceiverARCache", "PerceiverCacheMode"]
