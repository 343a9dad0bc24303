"""Perceiver AR (arXiv 2202.07765) and the context-propagating variants of arXiv 2412.06106.

Specification: `reference/perceiver_ar_and_llp.md` (§1 Perceiver AR, §2 the 2412.06106 family, §4 the variants
as masks, §7 the tests). LLP/ECP, the fourth member of the family, is in `perceiver_llp.py`; it shares the
masks, the blocks and the faithful attention defined here.

A window of at most `n = max_seq_len` tokens ends in `N = num_latents` **latents** (its last N positions); the
positions before them are the **prefix** (context), `h = n − N` of them in a full window. Every variant is one
stack of pre-norm blocks whose attention is a boolean mask over window positions `(t, u)` (§4), and every variant
is trained and scored on its latents only. They differ in the rows the stack carries:

- `ar` — Perceiver AR (§1): layer 0 is a cross-attention from the N latents to all window positions with the
  bottom-right-aligned causal mask `u ≤ t` (latent `i` sits at `t = i + (n − N)`; SDPA's `is_causal` is top-left
  aligned and would be wrong here); layers 1… are causal self-attention over the N latents only.
- `double` (§2.5): every layer carries all rows; context rows attend to context rows bidirectionally
  (`t < h: u < h`), latent rows to everything before them (`t ≥ h: u ≤ t`): the context is refined in every layer.
- `split` (§2.7): as `double`, but a context row sees only its own segment of the context,
  `t < h: u < h ∧ σ(u) = σ(t)` with `σ(t) = ⌊t·S/h⌋`.
- `compressed` (§2.6): layer 0 as `double`; then the h context rows are mixed along the sequence axis into
  `c = compressed_len` rows by a learned `P: R^h → R^c` (Linformer-style), and the later layers carry c + N rows
  with the `double` mask in compacted coordinates. `P` fixes h, so a shorter window is left-padded to n.

Context rows of `double`/`split`/`compressed` attend bidirectionally, so their outputs depend on later context
tokens: they are never scored (§7.6). The latents are causal.

Outputs: `forward` returns the logits `[B, L, V]` of the last `L = min(T, N)` positions only (the latents), and
with `targets [B, T]` the next-token loss on those positions (`targets[:, -L:]`). The causal-LM task scores a
model's last `logits.shape[1]` targets, so training and evaluation see the latent-only loss. A sequence longer
than n is read through its last n tokens (older tokens drop out), in `forward` and in every cache alike.

Modes (§2.9). The clean default is the library's LLaMA-style block (RMSNorm, separate q/k/v projections without
biases, SwiGLU, RoPE on q and k in every layer at absolute positions counted from the start of the sequence,
boolean masks, no dropout), so the family differs from `llama_lm` only in its attention pattern and latents (with
every position a latent, `ar`, `double` and `split` *are* `llama_lm`, weight for weight). `faithful=True`
reproduces the authors' code (MetaMain/ECPTransformer): LayerNorm; one `to_kv` projection serving as keys *and*
values, normalised per head by a LayerNorm; RoPE (θ 10000, full head dim, positions 0… of the window) on q and
K=V — so the values are rotated too — in layer 0 only (every layer for `double`); GELU ×4 feed-forward with
biases; dropout 0.05; a head with a bias; for `compressed` the misaligned residual (the embeddings of the *first*
c + N tokens) and a `projection_hist` built in every layer but used in layer 0 only. Not reproduced: the masked
fill with −finfo.max (boolean masks give the same result when a row has a visible key, which every real row has),
the fixed input length (any T ≤ n is accepted), and the dropout after the second feed-forward linear (the
library's `Mlp` drops after both; identical in evaluation).

Not implemented from the official Perceiver AR (§1): the token-linear query init, separate query/key-value
LayerNorms in the cross-attend, squared-ReLU, rotary on a fraction of the channels, the z-loss (a task-level loss
term), zero-initialised logits, latent dropout. Cross-attend dropout (§1.5) is `cross_attn_dropout`.

Decoding (§1.7). Generation continues the sequence one token at a time; the reference (`use_cache=False`) runs
`forward` over the whole sequence each step, i.e. the last n tokens with the last N as latents — the exact mode of
the spec, which every cache here reproduces to float tolerance at every length:

- `ar`, clean, `cache_mode="exact"` (`PerceiverARCache`): the cross-attention keys/values of the window are cached
  (they come from the embeddings, so they never go stale; the oldest drop out past n tokens), and so are the
  cross-attend outputs of the latents while the window start stays at 0 (T ≤ n) and the latent KV caches while
  every position is a latent (T ≤ N). What the sliding windows invalidate is recomputed: past N tokens the latent
  stack over the N latents (each latent's attention span starts at the oldest latent, which moves every step),
  past n tokens also the N cross-attend rows. So decoding costs O(1) rows per token up to N, then the latent stack.
- `ar`, clean, `cache_mode="latent_kv"`: the official `fixed_size_kv` memory: each step adds one latent to the
  latent KV caches; when they hold N latents a fresh forward over the window with N/2 latents refills them. It
  equals the exact mode while T ≤ N and `forward(window, num_latents=N/2)` right after a refill; in between, the
  cached latents were computed under older splits (the mismatch the official code accepts). Not a default.
- every other variant, and the faithful mode: `WindowCache`, the last n tokens, recomputed at every step. Context
  rows attend bidirectionally to each other, so a step that turns a latent into context changes every row; and
  the faithful RoPE counts positions from the window start, so a sliding window re-rotates every key and value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, nearest
from ..layers.attention import Attention, KVCache
from ..layers.block import TransformerBlock
from ..layers.mlp import GatedMlp, Mlp, llama_hidden_size
from ..layers.norm import RMSNorm
from ..layers.rope import Rotary, RotaryEmbedding
from ..layers.token_io import TokenIO
from ..ops.attention import attention, causal_mask, padding_to_attn_mask
from ..ops.losses import cross_entropy
from ..registry import register_model
from .generation import CausalLMMixin


class PerceiverVariant(str, Enum):
    """Which rows the stack carries and how they attend (module docstring, spec §4)."""

    AR = "ar"
    DOUBLE = "double"
    COMPRESSED = "compressed"
    SPLIT = "split"


class PerceiverCacheMode(str, Enum):
    """How clean Perceiver AR (`ar`) decodes: `EXACT` equals the uncached forward; `LATENT_KV` is the official
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


# ---------------------------------------------------------------------------------------------------------------
# The variants as masks (§4): pure functions of query positions `t` [..., Tq] and key positions `u` [..., Tk],
# returning `allowed` [..., Tq, Tk] (True = may attend). Padding is combined by AND outside.
# ---------------------------------------------------------------------------------------------------------------

def _pairs(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q_pos[..., :, None], k_pos[..., None, :]


def _per_row(value: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An int, or a per-row tensor `[...]`, broadcastable against `[..., Tq, Tk]`."""
    return torch.as_tensor(value, device=like.device)[..., None, None]


def causal_mask_at(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Dense causal attention, and the Perceiver AR cross-attend and latent layers: `u ≤ t`."""
    t, u = _pairs(q_pos, k_pos)
    return u <= t


def double_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, context_len: int | torch.Tensor) -> torch.Tensor:
    """Double attention (§2.5), and compressed attention in compacted coordinates with `context_len = c` (§2.6):
    context rows `t < h` see the context `u < h` (bidirectionally); latent rows `t ≥ h` see `u ≤ t`."""
    t, u = _pairs(q_pos, k_pos)
    h = _per_row(context_len, t)
    return torch.where(t < h, u < h, u <= t)


def split_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, context_len: int | torch.Tensor,
               num_segments: int) -> torch.Tensor:
    """Split attention (§2.7): context rows see their own segment `σ(u) = σ(t)`, `σ(t) = ⌊t·S/h⌋`, of the
    context; latent rows see `u ≤ t`."""
    t, u = _pairs(q_pos, k_pos)
    h = _per_row(context_len, t)
    segment = lambda p: torch.div(p * num_segments, h.clamp_min(1), rounding_mode="floor")
    return torch.where(t < h, (u < h) & (segment(u) == segment(t)), u <= t)


def llp_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, segment_len: int) -> torch.Tensor:
    """LLP/ECP pairwise segment attention (§2.8): `u ≤ t ∧ ⌊u/m⌋ ≥ ⌊t/m⌋ − 1`, a block-aligned sliding window
    of the current and the previous segment of `m = segment_len` tokens."""
    t, u = _pairs(q_pos, k_pos)
    return (u <= t) & (torch.div(u, segment_len, rounding_mode="floor")
                       >= torch.div(t, segment_len, rounding_mode="floor") - 1)


# ---------------------------------------------------------------------------------------------------------------
# Layers shared by the family
# ---------------------------------------------------------------------------------------------------------------

class TiedKVAttention(nn.Module):
    """The attention of the authors' code for arXiv 2412.06106 (faithful mode, §2.9).

    One bias-free projection `kv_proj` (the code's `to_kv = Linear(D, D)`) serves as keys *and* values; a per-head
    LayerNorm over the head channels normalises it (`apply_kv_norm=False` keeps the norm's parameters but skips it,
    as in `ECPAttentionTransformer.py`); RoPE, when passed, rotates the queries and K=V, so the values are rotated
    too. `o_proj` has a bias; with `first_segment_out`, the rows flagged by `first_rows` (ECP's segment 0) use their
    own output projection `o_proj_first` (the code's `to_out_0`).

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
        if self.apply_kv_norm:
            kv = self.kv_norm(kv)
        if rope is not None:
            kv = rope.apply(kv)
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


def family_block(dim: int, num_heads: int, *, faithful: bool, dropout: float, mlp_hidden_dim: int | None,
                 norm_eps: float, apply_kv_norm: bool = True, first_segment_out: bool = False) -> TransformerBlock:
    """One pre-norm block of the family: the library's LLaMA block (clean) or the authors' block (faithful)."""
    if faithful:
        attn = TiedKVAttention(dim, num_heads, apply_kv_norm=apply_kv_norm, first_segment_out=first_segment_out,
                               attn_drop=dropout)
        return TransformerBlock(dim, attn, Mlp(dim, 4 * dim, act_layer=nn.GELU, bias=True, drop=dropout),
                                nn.LayerNorm)
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


def real_positions(mask: torch.Tensor | None, B: int, T: int, device, start: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Positions `[B, T]`: `start [B]` (real tokens before this call; default 0) plus the real tokens before each
    token in the call. A padding slot gets the position of the next real token (it is never attended)."""
    within = (torch.arange(T, device=device).expand(B, T) if mask is None
              else (mask.long().cumsum(1) - 1).clamp_min(0))
    return within if start is None else start[:, None] + within


def count_real(mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Real tokens per row `[B]`."""
    return torch.full((B,), T, device=device) if mask is None else mask.long().sum(1)


def keep_last(cache: KVCache, n: int) -> KVCache:
    """The cache without all but its last `n` slots (a sliding window); `offset` keeps counting."""
    if cache.k.shape[1] <= n:
        return cache
    mask = None if cache.key_padding_mask is None else cache.key_padding_mask[:, -n:]
    return KVCache(cache.k[:, -n:], cache.v[:, -n:], mask, cache.offset)


def cat_optional(a: torch.Tensor | None, b: torch.Tensor | None, shape_a, shape_b, device) -> torch.Tensor | None:
    """Concatenates two padding masks along time, where None means all real."""
    if a is None and b is None:
        return None
    a = torch.ones(shape_a, dtype=torch.bool, device=device) if a is None else a
    b = torch.ones(shape_b, dtype=torch.bool, device=device) if b is None else b
    return torch.cat((a, b), 1)


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
    seen = None if cache is None else cache.seen
    positions = real_positions(mask, B, T, tokens.device, seen)
    seen = (0 if seen is None else seen) + count_real(mask, B, T, tokens.device)
    if cache is not None:
        mask = cat_optional(cache.mask, mask, cache.tokens.shape, tokens.shape, tokens.device)
        tokens = torch.cat((cache.tokens, tokens), 1)
        positions = torch.cat((cache.positions, positions), 1)
    tokens, positions = tokens[:, -window:], positions[:, -window:]
    mask = None if mask is None else mask[:, -window:]
    logits = window_logits(tokens, mask, positions)
    return logits[:, -min(T, logits.shape[1]):], WindowCache(tokens, mask, positions, seen)


def unpack_documents(tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """Documents packed into one row `[1, ΣT]` as a left-padded batch: `(tokens [D, T_max], mask [D, T_max],
    lengths [D])`. Left padding puts each document's end (its latents) in the last columns."""
    cu = cu_seqlens.to(device=tokens.device, dtype=torch.long)
    if tokens.shape[0] != 1 or cu[0] != 0 or cu[-1] != tokens.shape[1] or (cu.diff() < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {tokens.shape[1]} of one row "
                         f"(B == 1), got {cu.tolist()}")
    lengths = cu.diff()
    T = int(lengths.max())
    col = torch.arange(T, device=tokens.device)
    mask = col[None, :] >= (T - lengths)[:, None]  # (D, T): the last `length` columns of each row
    src = (cu[:-1, None] + col[None, :] - (T - lengths)[:, None]).clamp(0, tokens.shape[1] - 1)
    return torch.where(mask, tokens[0][src], 0), mask, lengths


def pack_outputs(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpack_documents` for outputs of the last `L` columns `[D, L, ...]`: each document's last
    `min(length, L)` rows, concatenated into one row `[1, Σ min(length, L), ...]`."""
    L = out.shape[1]
    return torch.cat([out[d, L - min(int(n), L):] for d, n in enumerate(lengths)])[None]


# ---------------------------------------------------------------------------------------------------------------
# Perceiver AR and the Double / Compressed / Split variants
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PerceiverARCache:
    """The decoding state of clean Perceiver AR (`variant="ar"`, see the module docstring).

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


class PerceiverAR(CausalLMMixin, nn.Module):
    """Perceiver AR and the Double / Compressed / Split attention variants of arXiv 2412.06106 (module docstring).

    Args:
        vocab_size (int): token ids `V`. Default: 256 (byte-level).
        dim (int): width `D`. Default: 128.
        depth (int): blocks, the cross-attend layer of `ar` included (the authors' count). Default: 4.
        num_heads (int): attention heads, in every layer. Default: 4.
        max_seq_len (int): the window `n`: the most tokens one forward reads. Default: 1024.
        num_latents (int): latents `N ≤ n`, the positions that are trained and scored. Default: 512.
        variant (PerceiverVariant | str): "ar", "double", "compressed" or "split". Default: "ar".
        num_segments (int): context segments `S` of `split`. Default: 4.
        compressed_len (int, Optional): compressed context rows `c` of `compressed`. Default: `n // 4` (the
            authors' script).
        faithful (bool): reproduce the authors' code instead of the clean default (module docstring). Default: False.
        cache_mode (PerceiverCacheMode | str): decoding of clean `ar`, "exact" or "latent_kv". Default: "exact".
        cross_attn_dropout (float): during training, the fraction of prefix positions removed from the cross-attend
            layer of `ar` (Perceiver AR's encoder dropout, §1.5). Default: 0.0.
        dropout (float, Optional): dropout on attention weights and residual branches; None = 0.05 (faithful) or
            0.0 (clean).
        rope_base (float): RoPE frequency base. Default: 10000.0.
        norm_eps (float): RMSNorm epsilon (clean). Default: 1e-6.
        mlp_hidden_dim (int, Optional): SwiGLU width (clean); None = LLaMA's `8D/3` rounded up to 64.
        tie_embeddings (bool): the head reuses the embedding matrix (clean mode). Default: False.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 max_seq_len: int = 1024, num_latents: int = 512, variant: PerceiverVariant | str = "ar",
                 num_segments: int = 4, compressed_len: int | None = None, faithful: bool = False,
                 cache_mode: PerceiverCacheMode | str = "exact", cross_attn_dropout: float = 0.0,
                 dropout: float | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6,
                 mlp_hidden_dim: int | None = None, tie_embeddings: bool = False):
        super().__init__()
        self.variant = parse_enum(PerceiverVariant, variant, "variant")
        self.cache_mode = parse_enum(PerceiverCacheMode, cache_mode, "cache_mode")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 1 <= num_latents <= max_seq_len:
            raise ValueError(f"num_latents ({num_latents}) must be between 1 and max_seq_len ({max_seq_len})")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if not 0.0 <= cross_attn_dropout < 1.0:
            raise ValueError(f"cross_attn_dropout must be in [0, 1), got {cross_attn_dropout}")
        self.vocab_size, self.dim, self.depth, self.faithful = vocab_size, dim, depth, faithful
        self.max_seq_len, self.num_latents, self.num_segments = max_seq_len, num_latents, num_segments
        self.cross_attn_dropout = cross_attn_dropout
        self.context_len = max_seq_len - num_latents  # h of a full window
        dropout = (0.05 if faithful else 0.0) if dropout is None else dropout
        self.io = family_token_io(vocab_size, dim, faithful=faithful, norm_eps=norm_eps,
                                  tie_embeddings=tie_embeddings)
        self.rope = RotaryEmbedding(dim // num_heads, base=rope_base)
        self.blocks = nn.ModuleList(
            family_block(dim, num_heads, faithful=faithful, dropout=dropout, mlp_hidden_dim=mlp_hidden_dim,
                         norm_eps=norm_eps) for _ in range(depth))
        # Faithful RoPE: layer 0 only, except in Double attention (every layer); clean: every layer.
        every_layer = not faithful or self.variant is PerceiverVariant.DOUBLE
        self.rope_in_layer = tuple(every_layer or i == 0 for i in range(depth))
        if self.variant is PerceiverVariant.COMPRESSED:
            self.compressed_len = compressed_len or max_seq_len // 4
            if self.context_len < 1 or self.compressed_len < 1:
                raise ValueError("the compressed variant needs a context (num_latents < max_seq_len) and "
                                 "compressed_len >= 1")
            # P: R^h → R^c along the sequence axis; the authors build one per layer and use the first (§2.6).
            self.compress = nn.ModuleList(nn.Linear(self.context_len, self.compressed_len)
                                          for _ in range(depth if faithful else 1))
        elif compressed_len is not None:
            raise ValueError(f"compressed_len is an option of the compressed variant, not of {self.variant.value!r}")
        if self.variant is PerceiverVariant.SPLIT and num_segments < 1:
            raise ValueError(f"num_segments must be at least 1, got {num_segments}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_family_weights(self, self.depth)
        for p in getattr(self, "compress", []):  # mixes h rows: variance-preserving
            nn.init.normal_(p.weight, std=p.in_features ** -0.5)
            nn.init.zeros_(p.bias)

    # -- inputs ----------------------------------------------------------------------------------------------

    def _rotary(self, layer: int, positions: torch.Tensor | None) -> Rotary | None:
        return self.rope(positions) if positions is not None and self.rope_in_layer[layer] else None

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
            positions = real_positions(mask, *tokens.shape, tokens.device)
        return tokens, mask, positions

    # -- the trunk of each variant ---------------------------------------------------------------------------

    def _cross_attend(self, queries: torch.Tensor, query_pos: torch.Tensor, cross: KVCache,
                      num_latents: int) -> torch.Tensor:
        """Cross-attend layer (layer 0 of `ar`) for the last `R` window columns `queries [B, R, D]`: attention to
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
            query_mask = cat_optional(cache.query_mask, mask, cache.queries.shape[:2], (B, T), x.device)
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
        seen = count_real(mask, B, T, x.device) if seen is None else seen
        new_cache = PerceiverARCache(cross, queries, query_pos, query_mask, cross_out, latents, latent_len, columns,
                                     seen)
        return out[:, -new:], new_cache

    def _rows(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
              num_latents: int) -> torch.Tensor:
        """Double / Split / Compressed over one window (`tokens [B, T]`, T ≤ n): the final rows, latents last."""
        B, T = tokens.shape
        L = min(T, num_latents)
        if self.variant is PerceiverVariant.COMPRESSED:
            return self._compressed(tokens, mask, positions)
        window_pos = real_positions(mask, B, T, tokens.device)  # t, u: real index within the window
        real = count_real(mask, B, T, tokens.device)
        context = real - real.clamp(max=L)  # h per row: real tokens before the latent columns
        if self.variant is PerceiverVariant.DOUBLE:
            allowed = double_mask(window_pos, window_pos, context)
        else:
            allowed = split_mask(window_pos, window_pos, context, self.num_segments)
        allowed = allowed[:, None]  # (B, 1, T, T)
        x = self.io.embed_tokens(tokens)
        for i, block in enumerate(self.blocks):
            x, _ = block(x, rope=self._rotary(i, positions), attn_mask=allowed, key_padding_mask=mask)
        return x

    def _compressed(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Compressed double attention (§2.6) over a window left-padded to n columns; rows `[B, c + N, D]`."""
        n, h, c = self.max_seq_len, self.context_len, self.compressed_len
        B, T = tokens.shape
        if tokens.shape[1] < n:  # P: R^h → R^c needs exactly h context columns
            mask = torch.cat((torch.zeros(B, n - T, dtype=torch.bool, device=tokens.device),
                              torch.ones(B, T, dtype=torch.bool, device=tokens.device) if mask is None else mask), 1)
            tokens, positions = F.pad(tokens, (n - T, 0)), F.pad(positions, (n - T, 0))
        cols = torch.arange(n, device=tokens.device)
        block = self.blocks[0]
        x = self.io.embed_tokens(tokens)  # (B, n, D)
        y, _ = block.attn(block.norm1(x), rope=self._rotary(0, positions), attn_mask=double_mask(cols, cols, h),
                          key_padding_mask=mask)
        squeeze = lambda z: self.compress[0](z.transpose(1, 2)).transpose(1, 2)  # (B, h, D) → (B, c, D)
        if self.faithful:  # the authors' residual: the embeddings of the first c + N tokens, misaligned
            x = torch.cat((squeeze(y[:, :h]), y[:, h:]), 1) + x[:, :c + self.num_latents]
        else:  # compress the context rows of the residual stream after the attention sub-layer
            x = x + block.drop_path(y)
            x = torch.cat((squeeze(x[:, :h]), x[:, h:]), 1)
        x = feed_forward(block, x)  # (B, c + N, D)
        rows = torch.arange(c + self.num_latents, device=tokens.device)
        pad = None if mask is None else torch.cat((mask.new_ones(B, c), mask[:, h:]), 1)
        # compressed rows have no position: NaN leaves them unrotated
        pos = torch.cat((torch.full((B, c), float("nan"), device=tokens.device), positions[:, h:].float()), 1)
        allowed = double_mask(rows, rows, c)
        for i, block in enumerate(self.blocks[1:], start=1):
            x, _ = block(x, rope=self._rotary(i, pos), attn_mask=allowed, key_padding_mask=pad)
        return x

    def _trunk(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
               num_latents: int) -> torch.Tensor:
        """The final rows of one window (latents last): the latents of `ar`, all rows of the others."""
        if self.variant is PerceiverVariant.AR:
            return self._ar(tokens, mask, positions, None, num_latents, tokens.shape[1])[0]
        return self._rows(tokens, mask, positions, num_latents)

    def _window_logits(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                       num_latents: int) -> torch.Tensor:
        """Logits `[B, L, V]` of the latents of the window ending the inputs (absolute `positions [B, T]`)."""
        tokens, mask, positions = self._window(tokens, mask, positions)
        L = min(tokens.shape[1], num_latents)
        return self.io.logits(self._trunk(tokens, mask, positions, num_latents)[:, -L:])

    # -- public API -------------------------------------------------------------------------------------------

    def _num_latents(self, num_latents: int | None) -> int:
        if num_latents is None:
            return self.num_latents
        if self.variant is PerceiverVariant.COMPRESSED and num_latents != self.num_latents:
            raise ValueError("the compressed variant's latent count is fixed by its compression (h = n − N)")
        if not 1 <= num_latents <= self.max_seq_len:
            raise ValueError(f"num_latents must be between 1 and max_seq_len ({self.max_seq_len}), got {num_latents}")
        return num_latents

    def forward_features(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                         num_latents: int | None = None) -> torch.Tensor:
        """The final rows of the window before the head, latents last: `[B, L, D]` for `ar`, `[B, T, D]` for
        `double`/`split` (context rows included — they are not causal), `[B, c + N, D]` for `compressed`."""
        B, T = tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        tokens, mask, positions = self._window(tokens, mask, real_positions(mask, B, T, tokens.device))
        return self._trunk(tokens, mask, positions, self._num_latents(num_latents))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                num_latents: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, L, V]` of the last `L = min(T, N)` positions (the latents) of `tokens [B, T]`, or
        `(logits, loss)` with next-token `targets [B, T]` (scored on `targets[:, -L:]`).

        Args:
            tokens (Tensor): `[B, T]` int64; only the last n columns are read.
            targets (Tensor, Optional): `[B, T]` int64, -100 = not scored.
            attention_mask (Tensor, Optional): `[B, T]` bool, True = real token. Prompts of different lengths go
                left-padded: the latents are the last columns, so a left-padded row equals its unpadded version.
            cu_seqlens (Tensor, Optional): `[D + 1]` offsets of documents packed into one row (`B == 1`); each
                document is its own sequence, and the logits are its latents' in order: `[1, Σ min(T_d, N), V]`.
            num_latents (int, Optional): latents for this call instead of N (the refill forward of `latent_kv`
                decoding; not for `compressed`).
        """
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("packed documents (cu_seqlens) take no attention_mask")
            docs, doc_mask, lengths = unpack_documents(tokens, cu_seqlens)
            logits = pack_outputs(self(docs, attention_mask=doc_mask, num_latents=num_latents), lengths)
            if targets is None:
                return logits
            doc_targets, _, _ = unpack_documents(targets, cu_seqlens)
            L = min(docs.shape[1], self.max_seq_len, self._num_latents(num_latents))
            return logits, cross_entropy(logits, pack_outputs(doc_targets[:, -L:], lengths))
        B, T = tokens.shape
        if self.training and tokens.shape[1] > self.max_seq_len:
            raise UserError(f"A training row of {T} tokens is longer than the model's window "
                            f"max_seq_len={self.max_seq_len}, whose older tokens would be ignored; set "
                            f"data.seq_len <= {self.max_seq_len}.")
        mask = None if attention_mask is None else attention_mask.bool()
        logits = self._window_logits(tokens, mask, real_positions(mask, B, T, tokens.device),
                                     self._num_latents(num_latents))  # (B, L, V)
        return logits if targets is None else (logits, cross_entropy(logits, targets[:, -logits.shape[1]:]))

    def forward_cached(self, tokens: torch.Tensor, cache: PerceiverARCache | WindowCache | None = None, *,
                       attention_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, PerceiverARCache | WindowCache]:
        """Continues `cache` (None = a new sequence) with `tokens [B, T]`: the logits of the new tokens that are
        latents of the current window, `[B, min(T, N), V]` — what `forward` over the whole sequence gives for
        them — and the new cache (`PerceiverARCache` for clean `ar`, `WindowCache` otherwise).

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool for the new tokens (left-padded prompts).
        """
        if self.variant is not PerceiverVariant.AR or self.faithful:
            return window_cached(partial(self._window_logits, num_latents=self.num_latents), tokens, cache,
                                 attention_mask, self.max_seq_len)
        n, (B, T) = self.max_seq_len, tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        start = None if cache is None else cache.seen
        positions = real_positions(mask, B, T, tokens.device, start)
        seen = count_real(mask, B, T, tokens.device) + (0 if start is None else start)
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


@register_model(PerceiverAR, task="causal_lm")
def perceiver_double_nano():
    """Double attention (arXiv 2412.06106): the context refined in every layer; D 128, 4 layers, 1024/512 latents."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512, variant="double")


@register_model(PerceiverAR, task="causal_lm")
def perceiver_compressed_nano():
    """Compressed double attention (arXiv 2412.06106): context 512 → 256 rows after layer 0; D 128, 4 layers."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512, variant="compressed",
                compressed_len=256)


@register_model(PerceiverAR, task="causal_lm")
def perceiver_split_nano():
    """Split attention (arXiv 2412.06106): context in 4 segments; D 128, 4 layers, window 1024, 512 latents."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512, variant="split", num_segments=4)


__all__ = ["PerceiverAR", "PerceiverARCache", "PerceiverCacheMode", "PerceiverVariant", "TiedKVAttention",
           "WindowCache", "causal_mask_at", "double_mask", "family_block", "llp_mask", "split_mask"]
