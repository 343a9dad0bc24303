"""What the Perceiver family shares: Perceiver AR (arXiv 2202.07765), the Double / Compressed / Split variants and
LLP/ECP (arXiv 2412.06106). Specification: `reference/perceiver_ar_and_llp.md`.

- `family_block`, `family_token_io`, `init_family_weights`: the block, token I/O and initialisation of every
  member, in the clean mode (the library's LLaMA block: RMSNorm, bias-free separate q/k/v, SwiGLU, RoPE on q and k,
  no dropout) or the faithful one (the authors' code, MetaMain/ECPTransformer: LayerNorm, `TiedKVAttention`,
  GELU ×4 feed-forward with biases, dropout 0.05 on the attention weights and the feed-forward's hidden
  activations, a head with a bias). With every position a latent or one segment, the clean models *are*
  `llama_lm`, weight for weight.
- `PerceiverFamilyLM`: the members' common body (embedding, RoPE, the stack of blocks, where RoPE sits, init).
- `LatentPerceiver`: what the four latent models share (`PerceiverAR` in `perceiver_ar.py`, the row-stacking
  variants in `perceiver_variants.py`): a window of at most `n = max_seq_len` tokens whose last `N = num_latents`
  positions are the latents; `forward` returns the logits of the latents only and scores them; packed documents
  run as a left-padded batch, so that each document's end sits in the latent columns.
- `WindowCache`, `window_cached`: decoding by recomputing the last n tokens, for the members whose rows change
  when the window slides (context rows attend bidirectionally; faithful RoPE counts from the window start).
- `attend`, `feed_forward`, `keep_last`: the sub-layers of a block called one at a time, and a sliding KV window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..layers.attention import Attention, KVCache
from ..layers.block import TransformerBlock
from ..layers.mlp import GatedMlp, Mlp, llama_hidden_size
from ..layers.norm import RMSNorm
from ..layers.rope import Rotary, RotaryEmbedding
from ..layers.tied_kv_attention import TiedKVAttention
from ..layers.token_io import TokenIO
from ..ops.losses import cross_entropy
from ..ops.sequence import cat_padding_masks, pack_sequences, real_counts, real_positions, unpack_sequences
from .generation import CausalLMMixin


def family_block(dim: int, num_heads: int, *, faithful: bool, dropout: float, mlp_hidden_dim: int | None,
                 norm_eps: float, apply_kv_norm: bool = True, first_segment_out: bool = False) -> TransformerBlock:
    """One pre-norm block of the family: the library's LLaMA block (clean) or the authors' block (faithful)."""
    if faithful:
        attn = TiedKVAttention(dim, num_heads, apply_kv_norm=apply_kv_norm, first_segment_out=first_segment_out,
                               attn_drop=dropout)
        mlp = Mlp(dim, 4 * dim, act_layer=nn.GELU, bias=True, drop=dropout, output_drop=False)
        return TransformerBlock(dim, attn, mlp, nn.LayerNorm)
    attn = Attention(dim, num_heads, proj_bias=False, attn_drop=dropout, proj_drop=dropout)
    hidden = mlp_hidden_dim or llama_hidden_size(dim, multiple_of=64)
    return TransformerBlock(dim, attn, GatedMlp(dim, hidden, drop=dropout), partial(RMSNorm, eps=norm_eps))


def family_token_io(vocab_size: int, dim: int, *, faithful: bool, norm_eps: float,
                    tie_embeddings: bool = False) -> TokenIO:
    """Embedding and head: RMSNorm + bias-free head (clean), LayerNorm + untied head with a bias (faithful)."""
    if faithful:
        if tie_embeddings:
            raise ValueError("the faithful mode has the authors' untied head with a bias; tie_embeddings is a clean "
                             "mode option")
        return TokenIO(vocab_size, dim, norm_layer=nn.LayerNorm, head_bias=True)
    return TokenIO(vocab_size, dim, norm_eps=norm_eps, tie_embeddings=tie_embeddings)


def init_family_weights(model: nn.Module, depth: int) -> None:
    """Normal(0, 0.02) for linears and embeddings, zero biases; the projections that write into the residual
    stream scaled by `1/√(2·depth)` (GPT-2), as in `LlamaLM`."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "o_proj_first.weight", "mlp.w2.weight", "mlp.fc2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))


def attend(block: TransformerBlock, x: torch.Tensor, context: KVCache, **attn_kwargs) -> torch.Tensor:
    """The attention sub-layer of `block` for query rows `x [B, T, D]`: `x + Attn(Norm(x), context)`."""
    y, _ = block.attn(block.norm1(x), context=context, **attn_kwargs)
    return x + block.drop_path(y)


def feed_forward(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The MLP sub-layer of `block`: `x + MLP(Norm(x))`."""
    return x + block.drop_path(block.mlp(block.norm2(x)))


def keep_last(cache: KVCache, n: int) -> KVCache:
    """The cache without all but its last `n` slots (a sliding window); `offset` keeps counting."""
    if cache.k.shape[1] <= n:
        return cache
    mask = None if cache.key_padding_mask is None else cache.key_padding_mask[:, -n:]
    return KVCache(cache.k[:, -n:], cache.v[:, -n:], mask, cache.offset)


@dataclass
class WindowCache:
    """The decoding state of a model that recomputes its window: its last ≤ n tokens.

    Attributes:
        tokens (Tensor): `[B, W]` the window's tokens.
        mask (Tensor, Optional): `[B, W]` bool, True = real token; None = all real.
        positions (Tensor): `[B, W]` their positions counted from the start of the sequence.
        seen (Tensor): `[B]` real tokens seen so far (the next position).
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor
    seen: torch.Tensor


def window_cached(window_logits: Callable[..., torch.Tensor], tokens: torch.Tensor, cache: WindowCache | None,
                  attention_mask: torch.Tensor | None, window: int) -> tuple[torch.Tensor, WindowCache]:
    """`forward_cached` by recomputation: appends `tokens [B, T]` to the window, keeps its last `window` columns,
    and returns the logits that `window_logits(tokens, mask, positions)` (logits of the window's last K positions)
    gives for the new tokens among them: `[B, min(T, K), V]`."""
    B, T = tokens.shape
    mask = None if attention_mask is None else attention_mask.bool()
    seen = 0 if cache is None else cache.seen
    positions = real_positions(mask, T, start=seen, batch_size=B, device=tokens.device)
    seen = seen + real_counts(mask, T, batch_size=B, device=tokens.device)
    if cache is not None:
        mask = cat_padding_masks(cache.mask, mask, cache.tokens.shape, tokens.shape, tokens.device)
        tokens = torch.cat((cache.tokens, tokens), 1)
        positions = torch.cat((cache.positions, positions), 1)
    tokens, positions = tokens[:, -window:], positions[:, -window:]
    mask = None if mask is None else mask[:, -window:]
    logits = window_logits(tokens, mask, positions)
    return logits[:, -min(T, logits.shape[1]):], WindowCache(tokens, mask, positions, seen)


class PerceiverFamilyLM(CausalLMMixin, nn.Module):
    """The body every member of the family shares: `io` (embedding and head), `rope`, `blocks` (`depth` family
    blocks), `rope_in_layer` and the initialisation.

    RoPE sits in every layer in the clean mode; in the faithful mode in layer 0 only, or in every layer with
    `faithful_rope_every_layer` (the authors' Double attention). `block_kwargs` go to `family_block`.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, *, faithful: bool,
                 dropout: float | None, rope_base: float, norm_eps: float, mlp_hidden_dim: int | None,
                 tie_embeddings: bool, faithful_rope_every_layer: bool = False, **block_kwargs):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.vocab_size, self.dim, self.depth, self.faithful = vocab_size, dim, depth, faithful
        dropout = (0.05 if faithful else 0.0) if dropout is None else dropout
        self.io = family_token_io(vocab_size, dim, faithful=faithful, norm_eps=norm_eps,
                                  tie_embeddings=tie_embeddings)
        self.rope = RotaryEmbedding(dim // num_heads, base=rope_base)
        self.blocks = nn.ModuleList(
            family_block(dim, num_heads, faithful=faithful, dropout=dropout, mlp_hidden_dim=mlp_hidden_dim,
                         norm_eps=norm_eps, **block_kwargs) for _ in range(depth))
        every_layer = not faithful or faithful_rope_every_layer
        self.rope_in_layer = tuple(every_layer or i == 0 for i in range(depth))

    def reset_parameters(self) -> None:
        init_family_weights(self, self.depth)

    def _rotary(self, layer: int, positions: torch.Tensor | None) -> Rotary | None:
        return self.rope(positions) if positions is not None and self.rope_in_layer[layer] else None


class LatentPerceiver(PerceiverFamilyLM):
    """A window of at most `n = max_seq_len` tokens whose last `N = num_latents` positions are the latents, the
    only positions a forward returns and scores (Perceiver AR and its row-stacking variants).

    A subclass defines `_trunk(tokens, mask, positions, num_latents)`: the final rows of one window (latents last)
    before the head. Arguments as `PerceiverAR`.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, max_seq_len: int, num_latents: int,
                 **family_kwargs):
        if not 1 <= num_latents <= max_seq_len:
            raise ValueError(f"num_latents ({num_latents}) must be between 1 and max_seq_len ({max_seq_len})")
        super().__init__(vocab_size, dim, depth, num_heads, **family_kwargs)
        self.max_seq_len, self.num_latents = max_seq_len, num_latents
        self.context_len = max_seq_len - num_latents  # h of a full window

    @property
    def max_train_len(self) -> int:
        """The longest training row: the window (a longer row's older tokens would be ignored)."""
        return self.max_seq_len

    def _trunk(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
               num_latents: int) -> torch.Tensor:
        raise NotImplementedError

    def _window(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        """The last n columns of the inputs, padding slots read as token 0 (the compressed variant mixes them into
        its context rows), and the RoPE positions the mode uses: absolute (clean) or counted from the window's
        first real token (faithful)."""
        n = self.max_seq_len
        tokens, positions = tokens[:, -n:], positions[:, -n:]
        mask = None if mask is None else mask[:, -n:]
        if mask is not None:
            tokens = tokens.masked_fill(~mask, 0)
        if self.faithful:
            positions = real_positions(mask, tokens.shape[1], batch_size=tokens.shape[0], device=tokens.device)
        return tokens, mask, positions

    def _window_logits(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                       num_latents: int) -> torch.Tensor:
        """Logits `[B, L, V]` of the latents of the window ending the inputs (absolute `positions [B, T]`)."""
        tokens, mask, positions = self._window(tokens, mask, positions)
        L = min(tokens.shape[1], num_latents)
        rows = self._trunk(tokens, mask, positions, num_latents)
        return self.io.logits(rows[:, rows.shape[1] - L:])  # not [:, -L:], which is every row when L = 0

    def _num_latents(self, num_latents: int | None) -> int:
        if num_latents is None:
            return self.num_latents
        if not 1 <= num_latents <= self.max_seq_len:
            raise ValueError(f"num_latents must be between 1 and max_seq_len ({self.max_seq_len}), got {num_latents}")
        return num_latents

    def forward_features(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                         num_latents: int | None = None) -> torch.Tensor:
        """The final rows of the window before the head, latents last (see each model for which rows)."""
        B, T = tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        positions = real_positions(mask, T, batch_size=B, device=tokens.device)
        tokens, mask, positions = self._window(tokens, mask, positions)
        return self._trunk(tokens, mask, positions, self._num_latents(num_latents))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                num_latents: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, L, V]` of the last `L = min(T, N)` positions (the latents) of `tokens [B, T]`, or
        `(logits, loss)` with next-token `targets [B, T]` (scored on `targets[:, -L:]`).

        Args:
            tokens (Tensor): `[B, T]` int64; only the last n columns are read (in training, T ≤ n).
            targets (Tensor, Optional): `[B, T]` int64, `IGNORE_INDEX` = not scored.
            attention_mask (Tensor, Optional): `[B, T]` bool, True = real token. Prompts of different lengths go
                left-padded: the latents are the last columns, so a left-padded row equals its unpadded version.
            cu_seqlens (Tensor, Optional): `[D + 1]` offsets of documents packed into one row (`B == 1`); each
                document is its own sequence, and the logits are its latents' in order: `[1, Σ min(T_d, N), V]`.
            num_latents (int, Optional): latents for this call instead of N (the refill forward of Perceiver AR's
                `latent_kv` decoding).
        """
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("packed documents (cu_seqlens) take no attention_mask")
            docs, doc_mask = unpack_sequences(tokens, cu_seqlens, left_pad=True)
            logits = pack_sequences(self(docs, attention_mask=doc_mask, num_latents=num_latents), doc_mask)
            if targets is None:
                return logits
            doc_targets, _ = unpack_sequences(targets, cu_seqlens, left_pad=True)
            L = min(docs.shape[1], self.max_seq_len, self._num_latents(num_latents))
            return logits, cross_entropy(logits, pack_sequences(doc_targets[:, -L:], doc_mask))
        B, T = tokens.shape
        if self.training and tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"a training row of {T} tokens exceeds max_seq_len {self.max_seq_len} (the window): "
                             f"its older tokens would be ignored")
        mask = None if attention_mask is None else attention_mask.bool()
        positions = real_positions(mask, T, batch_size=B, device=tokens.device)
        logits = self._window_logits(tokens, mask, positions, self._num_latents(num_latents))  # (B, L, V)
        return logits if targets is None else (logits, cross_entropy(logits, targets[:, -logits.shape[1]:]))

    def forward_cached(self, tokens: torch.Tensor, cache: WindowCache | None = None, *,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, WindowCache]:
        """Continues `cache` (None = a new sequence) with `tokens [B, T]`: the logits of the new tokens that are
        latents of the current window, `[B, min(T, N), V]` — what `forward` over the whole sequence gives for
        them — and the new cache, by recomputing the window (`window_cached`).

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool for the new tokens (left-padded prompts).
        """
        return window_cached(partial(self._window_logits, num_latents=self.num_latents), tokens, cache,
                             attention_mask, self.max_seq_len)


__all__ = ["LatentPerceiver", "PerceiverFamilyLM", "WindowCache", "attend", "family_block", "family_token_io",
           "feed_forward", "init_family_weights", "keep_last", "window_cached"]
