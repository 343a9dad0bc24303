"""LLP / ECP: the Long-LoRA-inspired Perceiver of arXiv 2412.06106 (v1: "Long LoRA Perceiver", LLP; v2: "Efficient
Context Propagating Perceiver", ECP; the authors' `ECPAttentionTransformer.py`). Spec §2.8–2.9.

Every layer carries every position (context propagation), and every position is trained (no latent training
dependency). The sequence is cut into segments of `m = segment_len` tokens; segment s attends to [segment s − 1 ‖
segment s], the previous one fully and its own under a causal triangle — each (s − 1, s) pair a small Perceiver AR
cross-attend — which is the mask

    allowed(t, u) = (u ≤ t) ∧ (⌊u/m⌋ ≥ ⌊t/m⌋ − 1)

(`llp_mask`): a block-aligned sliding window with one block of look-back, m + 1 to 2m keys wide. The receptive field
grows by one segment per layer. Per layer and head `2nm − m²` score entries instead of `n²`: whole rows in clean
mode are computed segment by segment (`polyattn.ops.attention.segment_pair_attention`), which computes only
those; padded rows, packed documents, cached calls and the faithful mode apply the materialised mask.

Clean mode (default): the library's LLaMA block (see `perceiver_family`), RoPE in every layer at positions counted from
the start of the sequence, and segments fixed relative to the sequence start, so a sequence of any length is one
function of its tokens; `forward_cached` keeps per layer the keys/values of the previous complete segment and of the
current one (`LLPCache`) and reproduces the full-sequence forward exactly for any length. With `segment_len ≥ T` the
model is a dense causal decoder — `llama_lm`, weight for weight.

Faithful mode (`faithful=True`, §2.9): the authors' block (`TiedKVAttention`: tied K=V, RoPE on q and K=V in layer 0
only at positions 0… of the window, the per-head LayerNorm built but unused, a separate output projection
`to_out_0` for segment 0; LayerNorm; GELU feed-forward with biases; dropout 0.05; head with a bias). It reads a
window of `max_seq_len` tokens (the authors' `sequence_len`): longer inputs are cut to their last n tokens and the
logits cover those, and decoding re-runs the window each step (as the authors' `generate`), so the segments are
re-partitioned whenever the window slides — a different function from the clean model beyond n tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..layers.attention import KVCache
from ..ops.attention import llp_mask, segment_pair_attention
from ..ops.losses import cross_entropy
from ..ops.sequence import document_positions, real_counts, real_positions
from ..registry import register_model
from .perceiver_family import PerceiverFamilyLM, WindowCache, window_cached


@dataclass
class LLPCache:
    """The decoding state of clean LLP: per layer the keys/values still visible to the next token.

    Attributes:
        layers (tuple[KVCache, ...]): one cache per layer (keys rotated), holding the columns from the start of
            the previous segment of the earliest row on.
        positions (Tensor): `[B, S]` the position of each cached column in its row.
        seen (Tensor): `[B]` real tokens seen so far (the next position).
    """

    layers: tuple[KVCache, ...]
    positions: torch.Tensor
    seen: torch.Tensor


class LLPTransformer(PerceiverFamilyLM):
    """LLP / ECP pairwise segment attention LM (module docstring).

    Args:
        vocab_size (int): token ids `V`. Default: 256 (byte-level).
        dim (int): width `D`. Default: 128.
        depth (int): blocks. Default: 4.
        num_heads (int): attention heads. Default: 4.
        segment_len (int): segment length `m` (the authors' `sequence_len / num_segments`). Default: 256.
        max_seq_len (int): the faithful mode's window `n` (the authors' `sequence_len`); the clean model has no
            maximum length. Default: 1024.
        faithful (bool): reproduce the authors' code (module docstring). Default: False.
        dropout, rope_base, norm_eps, mlp_hidden_dim, tie_embeddings: as `PerceiverAR`.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 segment_len: int = 256, max_seq_len: int = 1024, faithful: bool = False,
                 dropout: float | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6,
                 mlp_hidden_dim: int | None = None, tie_embeddings: bool = False):
        if segment_len < 1 or max_seq_len < 1:
            raise ValueError(f"segment_len ({segment_len}) and max_seq_len ({max_seq_len}) must be positive")
        # the authors' ECP layer computes its per-head K=V norm but does not use it, and projects segment 0 apart
        super().__init__(vocab_size, dim, depth, num_heads, faithful=faithful, dropout=dropout, rope_base=rope_base,
                         norm_eps=norm_eps, mlp_hidden_dim=mlp_hidden_dim, tie_embeddings=tie_embeddings,
                         apply_kv_norm=False, first_segment_out=True)
        self.segment_len, self.max_seq_len = segment_len, max_seq_len
        self.reset_parameters()

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
                mask: torch.Tensor | None, caches: tuple[KVCache, ...] | None = None, use_cache: bool = False,
                first_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[KVCache, ...]]:
        rope = self.rope(positions)
        extra = {} if first_rows is None else {"first_rows": first_rows}
        if allowed is None:  # whole rows (clean mode): segment by segment, O(T·m), instead of a [T, T] mask
            extra["block_sparse"] = partial(segment_pair_attention, segment_len=self.segment_len)
        new_caches = []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x, cache = block(x, rope=rope if self.rope_in_layer[i] else None, attn_mask=allowed,
                             key_padding_mask=mask, cache=cache, use_cache=use_cache, **extra)
            new_caches.append(cache)
        return x, tuple(new_caches)

    def _faithful_logits(self, tokens: torch.Tensor, mask: torch.Tensor | None,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
        """The authors' forward over the window: the last n tokens, positions and segments from its start."""
        n = self.max_seq_len
        tokens, mask = tokens[:, -n:], None if mask is None else mask[:, -n:]
        window_pos = real_positions(mask, tokens.shape[1], batch_size=tokens.shape[0], device=tokens.device)
        allowed = llp_mask(window_pos, window_pos, self.segment_len)[:, None]  # (B, 1, T, T)
        x, _ = self._layers(self.io.embed_tokens(tokens), window_pos, allowed, mask,
                            first_rows=window_pos < self.segment_len)
        return self.io.logits(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, T, V]` of `tokens [B, T]` (faithful: of its last `min(T, n)`), or `(logits, loss)` with
        next-token `targets [B, T]`.

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool, True = real token (left or right padding; positions
                and segments count real tokens, so a padded row equals its unpadded version).
            cu_seqlens (Tensor, Optional): `[D + 1]` offsets of documents packed into one row (`B == 1`); positions
                and segments restart at each document (clean mode).
        """
        B, T = tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        if self.faithful:
            if cu_seqlens is not None:
                raise ValueError("the faithful LLP reads one window per row; pass padded rows, not cu_seqlens")
            logits = self._faithful_logits(tokens, mask)
        else:
            if cu_seqlens is not None:
                if B != 1 or mask is not None:
                    raise ValueError("packed documents (cu_seqlens) need B == 1 and no attention_mask")
                doc, positions = document_positions(cu_seqlens.to(tokens.device), T)
                allowed = llp_mask(positions, positions, self.segment_len) & (doc[:, None] == doc[None, :])
                positions, allowed = positions[None], allowed[None, None]
            else:
                positions = real_positions(mask, T, batch_size=B, device=tokens.device)
                allowed = llp_mask(positions, positions, self.segment_len)[:, None] if mask is not None else None
            x, _ = self._layers(self.io.embed_tokens(tokens), positions, allowed, mask)
            logits = self.io.logits(x)
        return logits if targets is None else (logits, cross_entropy(logits, targets[:, -logits.shape[1]:]))

    def forward_cached(self, tokens: torch.Tensor, cache: LLPCache | WindowCache | None = None, *,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LLPCache | WindowCache]:
        """Continues `cache` (None = a new sequence) with `tokens [B, T]`: `(logits [B, T, V], new cache)`; equal
        to `forward` over the whole sequence at the new positions (faithful: to `forward` over the window).

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool for the new tokens (left-padded prompts).
        """
        if self.faithful:
            return window_cached(self._faithful_logits, tokens, cache, attention_mask, self.max_seq_len)
        m, (B, T) = self.segment_len, tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else cache.seen
        positions = real_positions(mask, T, start=start, batch_size=B, device=tokens.device)
        seen = real_counts(mask, T, batch_size=B, device=tokens.device) + start
        keys = positions if cache is None else torch.cat((cache.positions, positions), 1)  # (B, S)
        allowed = llp_mask(positions, keys, m)[:, None]  # (B, 1, T, S)
        x, caches = self._layers(self.io.embed_tokens(tokens), positions, allowed, mask,
                                 None if cache is None else cache.layers, use_cache=True)
        # Drop the columns no later token can see: those before the previous segment of every row's next token.
        first_visible = (torch.div(seen, m, rounding_mode="floor") - 1).clamp_min(0) * m  # (B,)
        needed = keys >= first_visible[:, None]  # (B, S)
        if caches[0].key_padding_mask is not None:
            needed = needed & caches[0].key_padding_mask
        needed = needed.any(0)  # (S,)
        drop = int(needed.long().argmax()) if needed.any() else keys.shape[1]
        if drop:
            caches = tuple(KVCache(c.k[:, drop:], c.v[:, drop:],
                                   None if c.key_padding_mask is None else c.key_padding_mask[:, drop:], c.offset)
                           for c in caches)
            keys = keys[:, drop:]
        return self.io.logits(x), LLPCache(caches, keys, seen)


@register_model(LLPTransformer, task="causal_lm")
def llp_nano():
    """LLP/ECP pairwise segment attention (arXiv 2412.06106): D 128, 4 layers, 4 heads, segments of 256 tokens."""
    return dict(dim=128, depth=4, num_heads=4, segment_len=256, max_seq_len=1024)


@register_model(LLPTransformer, task="causal_lm")
def llp_small():
    """LLP/ECP at the authors' width: D 768, 12 layers, 6 heads, segments of 256 tokens (window 2048 = 8 segments)."""
    return dict(dim=768, depth=12, num_heads=6, segment_len=256, max_seq_len=2048)


__all__ = ["LLPCache", "LLPTransformer"]
