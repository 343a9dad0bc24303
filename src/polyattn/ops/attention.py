"""Softmax attention with the mask operators used by the library's models, plus a float64 reference.

Layout: every tensor is sequence-first, `[B, T, H, D]` (as in flash-linear-attention): batch, tokens, heads,
channels. Queries have `H` heads, keys and values `Hkv` heads (grouped-query attention when `Hkv < H`).

Mask operators (iLLaMA, arXiv 2404.06773, §3 of `reference/illama.md`), with `A = q kᵀ · scale` and the causal
0/1 matrix `C` (bottom-right aligned, see `causal_mask`):

- `BIDIRECTIONAL`: `softmax(A)`.
- `CAUSAL`: `softmax(A + M)` with `M = −inf` on future keys.
- `ILLAMA_SOFT`: `softmax(A) ⊙ (a + (1 − a)·C)`, no renormalisation — the released iLLaMA operator. It is not
  causal even at `a = 0`: the softmax denominator still holds the future keys, so a token's output depends on
  later tokens through a scalar gain.
- `SOFT_CAUSAL`: `softmax(A + log(a + (1 − a)·C))`, renormalised; `a = 0` is exactly `CAUSAL`, `a = 1` is
  `BIDIRECTIONAL`.

The Perceiver family's masks at given positions (`causal_mask_at`, `double_mask`, `split_mask`, `llp_mask`)
sit beside `causal_mask` and the S²-Attn masks (`shifted_group_mask_at`).

Query rows that may attend to no key at all (all keys padded, or a causal query placed before every key)
return zeros, with zero gradients, instead of NaN.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from ..hardware import cpu_isa, native_bf16
from .checks import check_float

# SDPA shares kv heads across query groups without copying them from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class MaskMode(str, Enum):
    """Which attention-mask operator `attention` applies (see the module docstring for the formulas)."""

    BIDIRECTIONAL = "bidirectional"
    CAUSAL = "causal"
    ILLAMA_SOFT = "illama_soft"
    SOFT_CAUSAL = "soft_causal"


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The causal mask `[T, S]` (True = may attend), bottom-right aligned.

    Query `i` sits at absolute position `S − T + i`, so it sees keys `j ≤ S − T + i`. This is what a
    KV-cached decode needs (`T` new tokens after `S − T` cached ones); SDPA's `is_causal` is top-left aligned
    and masks the wrong keys when `T != S` (x-transformers #187). When `T > S` the first `T − S` queries see
    no key.
    """
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def shifted_group_mask_at(q_positions: torch.Tensor, k_positions: torch.Tensor, group_size: int, num_heads: int,
                          *, causal: bool = True) -> torch.Tensor:
    """LongLoRA S²-Attn mask (arXiv 2309.12307, spec `perceiver_ar_and_llp.md` §3.2) at given token positions.

    The positions are split into groups of `G = group_size`. Heads `h < H // 2` attend within groups
    `[kG, (k+1)G)`; heads `h ≥ H // 2` (LongLoRA shifts `qkv[:, H // 2:]`) within groups shifted by `G // 2`,
    which straddle the first half's boundaries:

        unshifted: allowed(t, u) = ⌊p_t / G⌋ = ⌊p_u / G⌋                  (∧ p_u ≤ p_t when causal)
        shifted:   allowed(t, u) = ⌊(p_t + G/2) / G⌋ = ⌊(p_u + G/2) / G⌋  (∧ p_u ≤ p_t when causal)

    No wrap-around: in the shifted half the first group is only `G/2` long and the last one may be partial, so
    nothing leaks across the ends of the sequence (this equals LongLoRA's flash-attn varlen implementation).

    Args:
        q_positions (Tensor): `[..., T]` int positions of the queries (e.g. `[T]`, or `[B, T]` counting real
            tokens only, so that a padded row equals its unpadded version).
        k_positions (Tensor): `[..., S]` int positions of the keys (a KV cache: every position seen so far).
        group_size (int): `G ≥ 1`.
        num_heads (int): `H`.
        causal (bool): also require `p_u ≤ p_t`. Default: True.

    Returns:
        Tensor: bool `[..., H, T, S]`, True = may attend.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be a positive number of tokens, got {group_size}")
    shift = (torch.arange(num_heads, device=q_positions.device) >= num_heads // 2).long() * (group_size // 2)
    shift = shift[:, None, None]  # (H, 1, 1)
    q = q_positions.long()[..., None, :, None]  # (..., 1, T, 1)
    k = k_positions.long()[..., None, None, :]  # (..., 1, 1, S)
    allowed = (q + shift) // group_size == (k + shift) // group_size  # (..., H, T, S)
    return allowed & (k <= q) if causal else allowed


def shifted_group_mask(T: int, group_size: int, num_heads: int, *, causal: bool = True, wrap_around: bool = False,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The S²-Attn mask `[H, T, T]` of a sequence of `T` tokens (see `shifted_group_mask_at`).

    `wrap_around=True` is the roll form of the paper's pseudo-code (§3.3, for reproduction only): the shifted
    heads' queries, keys and values are rolled by `−G/2`, grouped, and rolled back, so the last group holds the
    last `G/2` and the first `G/2` tokens together: tokens `0 … G/2 − 1` then see tokens `T − G/2 … T − 1`, the
    future (LongLoRA #15, #90). It needs `T` to be a multiple of `G`. The library default is the mask form
    (`wrap_around=False`), which never leaks.
    """
    pos = torch.arange(T, device=device)
    if not wrap_around:
        return shifted_group_mask_at(pos, pos, group_size, num_heads, causal=causal)
    if T % group_size:
        raise ValueError(f"the roll form of S²-Attn needs T ({T}) to be a multiple of group_size ({group_size})")
    shifted = (torch.arange(num_heads, device=device) >= num_heads // 2)[:, None]  # (H, 1)
    rolled = torch.where(shifted, (pos - group_size // 2) % T, pos)  # (H, T): each token's index after the roll
    q, k = rolled[:, :, None], rolled[:, None, :]
    allowed = q // group_size == k // group_size
    return allowed & (k <= q) if causal else allowed


# The Perceiver family's masks (spec `perceiver_ar_and_llp.md` §4): pure functions of query positions `t` [..., Tq]
# and key positions `u` [..., Tk], returning `allowed` [..., Tq, Tk] (True = may attend); padding is combined by AND
# outside. Positions are window positions (or absolute ones, for LLP), not slot indices.

def _pairs(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q_pos[..., :, None], k_pos[..., None, :]


def _choose(condition: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """`torch.where(condition, if_true, if_false)` for bool masks, written as logic: onnxruntime has no `Where`
    kernel for bool values (NOT_IMPLEMENTED when the session runs), so a mask built with `torch.where` exports to
    ONNX but does not run there. The result is the same bool tensor."""
    return (condition & if_true) | (~condition & if_false)


def _per_row(value: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An int, or a per-row tensor `[...]`, broadcastable against `[..., Tq, Tk]`."""
    return torch.as_tensor(value, device=like.device)[..., None, None]


def causal_mask_at(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention at given positions, `u ≤ t`: dense causal layers, and Perceiver AR's cross-attend (latent `i`
    of a window of n with N latents sits at `t = i + n − N`: bottom-right aligned, see `causal_mask`)."""
    t, u = _pairs(q_pos, k_pos)
    return u <= t


def double_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, context_len: int | torch.Tensor) -> torch.Tensor:
    """Double attention (arXiv 2412.06106 §2.5), and compressed attention in compacted coordinates with
    `context_len = c` (§2.6): context rows `t < h` see the context `u < h` (bidirectionally); latent rows `t ≥ h`
    see `u ≤ t`. `context_len` is `h`, an int or one per row `[...]`."""
    t, u = _pairs(q_pos, k_pos)
    h = _per_row(context_len, t)
    return _choose(t < h, u < h, u <= t)


def split_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, context_len: int | torch.Tensor,
               num_segments: int) -> torch.Tensor:
    """Split attention (arXiv 2412.06106 §2.7): context rows see their own segment `σ(u) = σ(t)`,
    `σ(t) = ⌊t·S/h⌋`, of the context; latent rows see `u ≤ t`."""
    t, u = _pairs(q_pos, k_pos)
    h = _per_row(context_len, t)
    segment = lambda p: torch.div(p * num_segments, h.clamp_min(1), rounding_mode="floor")
    return _choose(t < h, (u < h) & (segment(u) == segment(t)), u <= t)


def llp_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, segment_len: int) -> torch.Tensor:
    """LLP/ECP pairwise segment attention (arXiv 2412.06106 §2.8): `u ≤ t ∧ ⌊u/m⌋ ≥ ⌊t/m⌋ − 1`, a block-aligned
    sliding window of the current and the previous segment of `m = segment_len` tokens."""
    t, u = _pairs(q_pos, k_pos)
    return (u <= t) & (torch.div(u, segment_len, rounding_mode="floor")
                       >= torch.div(t, segment_len, rounding_mode="floor") - 1)


def padding_to_attn_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Turns a key padding mask `[B, S]` (True = real token) into an attention mask `[B, 1, 1, S]`."""
    return key_padding_mask.bool()[:, None, None, :]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_float("attention", q=q, k=k, v=v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    (B, _, H, D), (Bk, S, Hkv, Dk) = q.shape, k.shape
    if Bk != B or v.shape[0] != B or v.shape[1] != S or v.shape[2] != Hkv or Dk != D:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"k [B, S, Hkv, D] and v [B, S, Hkv, Dv]")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")


def _soft_gain(a: float | torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """`a + (1 − a)·C` in float32: 1 on past keys, `a` on future keys."""
    c = causal.float()
    return a + (1.0 - a) * c


class Backend(str, Enum):
    """Which implementation `attention` runs (both compute the same operator)."""

    AUTO = "auto"
    SDPA = "sdpa"
    EXPLICIT = "explicit"


# On a CPU with native bfloat16 products, SDPA's flash kernel has a high fixed cost per (batch, head) in bfloat16;
# below a number of keys that depends on the CPU, an explicit matmul-softmax-matmul in bfloat16 (softmax in
# float32) is faster for forward+backward, while SDPA wins above it and in float32. Measured fwd+bwd, 2 threads
# (`polyattn bench dtypes` takes it both ways):
# - AVX-512 BF16 (AMD EPYC, Zen 4, torch 2.13), explicit ÷ SDPA time, batch 8 × 4 heads of 32 | of 64, causal:
#   65 keys 0.49 | 0.39, 129: 0.66 | 0.51, 193: 1.31 | 0.72, 257: 1.72 | 0.97, 513: 3.3 | 2.5; bidirectional wins
#   up to 257 keys (0.55–0.72), loses from 385 (1.24–1.68); batch 32 × 4 × 64 loses from 257 either way
#   (1.25–1.67), ViT-T's 128 × 65 × 3 × 64 wins 0.23–0.32 → 192. (An earlier torch measured SDPA losing up to
#   ~1K keys here, and the threshold was 512: explicit 1.7–3.3x slower at 257–513 causal keys with this one.)
# - AMX (Intel Xeon), 8 × T × 4 heads of 32, causal, 2 threads: T=65: 3.0 vs 5.6 ms; T=257: 28.4 vs 19.1 ms → 128.
# Without native bfloat16 (AVX2) the explicit products are the slow part: T=65: 20.8 against SDPA's 8.2 ms; at
# 257 keys 256 against 72 ms (same shapes) → never.
EXPLICIT_MAX_KEYS_CPU = {"AVX-512 BF16": 192, "AMX": 128}


@torch.compiler.assume_constant_result  # traced code sees the number, not the lookup
def explicit_max_keys_cpu() -> int:
    """Keys up to which short bfloat16 attention takes the explicit path on this CPU (0: never)."""
    return EXPLICIT_MAX_KEYS_CPU.get(cpu_isa(), 0) if native_bf16("cpu") else 0


def _pick_backend(backend: Backend, mode: MaskMode, q: torch.Tensor, S: int) -> Backend:
    if mode is MaskMode.ILLAMA_SOFT:
        return Backend.EXPLICIT  # SDPA cannot express a post-softmax mask
    if backend is not Backend.AUTO:
        return backend
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and low_precision and explicit_max_keys_cpu() >= S:
        return Backend.EXPLICIT
    return Backend.SDPA


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_mode: MaskMode | str = MaskMode.BIDIRECTIONAL,
    soft_mask_a: float | torch.Tensor = 0.0,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """Multi-head softmax attention.

    Two implementations of the same operator: `F.scaled_dot_product_attention` (`BIDIRECTIONAL`, `CAUSAL`,
    and `SOFT_CAUSAL` as an additive float mask), and an explicit matmul-softmax-matmul, which is the only one
    that can express `ILLAMA_SOFT` and is faster on CPU for short sequences in bfloat16 (see `_pick_backend`).

    Args:
        q (Tensor): queries `[B, T, H, D]`.
        k (Tensor): keys `[B, S, Hkv, D]`; `H` must be a multiple of `Hkv`, each group of `H / Hkv` query heads
            shares one key/value head.
        v (Tensor): values `[B, S, Hkv, Dv]`.
        mask_mode (MaskMode | str): the mask operator. Causal masks are bottom-right aligned when `T != S`
            (query `i` at position `S − T + i`). Default: `BIDIRECTIONAL`.
        soft_mask_a (float | Tensor): the soft-mask value `a ∈ [0, 1]` for `ILLAMA_SOFT` and `SOFT_CAUSAL`
            (a float or a 0-d tensor); ignored by the other modes. Default: 0.0.
        attn_mask (Tensor, Optional): boolean mask broadcastable to `[B, H, T, S]` (True = may attend), e.g.
            `[B, 1, T, S]` or `padding_to_attn_mask(key_padding_mask)`. Combined with the mode's mask.
        scale (float, Optional): logit scale. Default: `D ** -0.5`.
        dropout_p (float): dropout on the attention weights (pass 0 in evaluation). Default: 0.0.
        backend (Backend | str): `AUTO` picks by device, dtype and length; `SDPA` or `EXPLICIT` force one
            (tests compare both). `ILLAMA_SOFT` always runs explicitly. Default: `AUTO`.

    Returns:
        Tensor: `[B, T, H, Dv]` in the dtype of `q`. Query rows with no visible key are zeros.
    """
    _check_shapes(q, k, v)
    mode = MaskMode(mask_mode)
    (_, T, H, D), S, Hkv = q.shape, k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a boolean tensor (True = may attend), got {attn_mask.dtype}")
    if _pick_backend(Backend(backend), mode, q, S) is Backend.EXPLICIT:
        return _attention_explicit(q, k, v, mode, soft_mask_a, attn_mask, scale, dropout_p)

    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa_kwargs = {}
    if Hkv != H:
        if _SDPA_HAS_GQA:
            gqa_kwargs = {"enable_gqa": True}
        else:
            kh, vh = kh.repeat_interleave(H // Hkv, dim=1), vh.repeat_interleave(H // Hkv, dim=1)

    # Decide statically whether some query row might see no key; only then pay for the row check.
    may_be_empty = attn_mask is not None or (mode is not MaskMode.BIDIRECTIONAL and T > S)
    if mode is MaskMode.SOFT_CAUSAL:
        bias = torch.log(_soft_gain(soft_mask_a, causal_mask(T, S, q.device)))  # (T, S), −inf where a = 0
        if attn_mask is not None:
            bias = torch.where(attn_mask, bias, float("-inf"))
        row_ok = (bias > float("-inf")).any(-1, keepdim=True)
        # A row of −inf gives NaN in the softmax; give it finite logits and zero it afterwards.
        bias = torch.where(row_ok, bias, 0.0).to(q.dtype)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, dropout_p=dropout_p, scale=scale,
                                           **gqa_kwargs)
        return _zero_empty_rows(o, row_ok).transpose(1, 2)

    if mode is MaskMode.CAUSAL and attn_mask is None and T == S:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, dropout_p=dropout_p, scale=scale,
                                           **gqa_kwargs)
        return o.transpose(1, 2)
    mask = attn_mask
    if mode is MaskMode.CAUSAL:
        causal = causal_mask(T, S, q.device)
        mask = causal if mask is None else mask & causal
    if not may_be_empty:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                           **gqa_kwargs)
        return o.transpose(1, 2)
    row_ok = mask.any(-1, keepdim=True)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask | ~row_ok, dropout_p=dropout_p, scale=scale,
                                       **gqa_kwargs)
    return _zero_empty_rows(o, row_ok).transpose(1, 2)


def _zero_empty_rows(o: torch.Tensor, row_ok: torch.Tensor) -> torch.Tensor:
    """Zeroes output rows `[B, H, T, Dv]` whose mask row `[..., T, 1]` had no visible key."""
    while row_ok.ndim < 4:
        row_ok = row_ok[None]
    return o * row_ok.to(o.dtype)


def _attention_explicit(q, k, v, mode: MaskMode, a, attn_mask, scale, dropout_p):
    """Every mask mode as matmul-softmax-matmul over grouped heads.

    The products run in the inputs' dtype (bfloat16 under autocast), the logits and softmax in float32.
    """
    T, H, S, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.unflatten(2, (Hkv, G))  # (B, T, Hkv, G, D)
    scores = torch.einsum("bthgd,bshd->bhgts", qg, k).float() * scale  # (B, Hkv, G, T, S)
    allowed = None
    if mode is MaskMode.CAUSAL:
        allowed = causal_mask(T, S, q.device)
    elif mode is MaskMode.SOFT_CAUSAL:
        gain = _soft_gain(a, causal_mask(T, S, q.device))
        allowed = gain > 0
        scores = scores + torch.log(gain.clamp_min(torch.finfo(torch.float32).tiny))
    if attn_mask is not None:
        mask = attn_mask
        while mask.ndim < 4:
            mask = mask[None]
        # Align the mask's head axis with the (Hkv, G) grouping of the scores.
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.unflatten(1, (Hkv, G))
        allowed = mask if allowed is None else mask & allowed
    if allowed is not None:
        row_ok = allowed.any(-1, keepdim=True)
        # Rows with no visible key get finite logits here and are zeroed below, instead of a NaN softmax.
        scores = scores.masked_fill(~(allowed | ~row_ok), float("-inf"))
    weights = scores.softmax(-1)
    if mode is MaskMode.ILLAMA_SOFT:
        weights = weights * _soft_gain(a, causal_mask(T, S, q.device))
    if allowed is not None:
        weights = weights * row_ok
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    o = torch.einsum("bhgts,bshe->bthge", weights.to(v.dtype), v)  # (B, T, Hkv, G, Dv)
    return o.flatten(2, 3).to(q.dtype)


def _check_whole_rows(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mode: MaskMode | str
                      ) -> MaskMode:
    """The checks of a block-by-block op (`shifted_group_attention`, `segment_pair_attention`): `attention`'s
    shapes, self-attention over one sequence (as many keys as queries), and a causal or bidirectional layer mode,
    which it returns."""
    _check_shapes(q, k, v)
    mode = MaskMode(mask_mode)
    if mode not in (MaskMode.CAUSAL, MaskMode.BIDIRECTIONAL):
        raise ValueError(f"{op} runs in a causal or bidirectional layer, not a {mode.value} one")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{op} is self-attention over one sequence: q has {q.shape[1]} positions, k {k.shape[1]}")
    return mode


def shifted_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    *,
    mask_mode: MaskMode | str = MaskMode.CAUSAL,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """LongLoRA's S²-Attn (arXiv 2309.12307) computed group by group, at O(T·G) cost instead of O(T²).

    The same operator as `attention(q, k, v, mask_mode=mask_mode, attn_mask=shifted_group_mask(T, G, H))` (the
    mask form, no wrap-around; a test compares them forward and backward), for self-attention over whole
    sequences at positions `0 … T − 1` (no padding, no cache): heads `h < H // 2` attend within the groups
    `[jG, (j+1)G)`, the others within the groups shifted by `G // 2` (a first group of `G − G // 2` tokens,
    then groups of `G`). Each run of whole groups is one batched `attention` call of length G; a shorter group at
    either end is a call of its own, so no padding enters any group.

    Args:
        q, k, v (Tensor): `[B, T, H, D]`, `[B, T, Hkv, D]`, `[B, T, Hkv, Dv]` (key/value heads are repeated to H).
        group_size (int): `G ≥ 2`.
        mask_mode (MaskMode | str): `CAUSAL` (within each group) or `BIDIRECTIONAL`. Default: `CAUSAL`.
        scale, dropout_p, backend: as `attention`.

    Returns:
        Tensor: `[B, T, H, Dv]` in the dtype of `q`.
    """
    mode = _check_whole_rows("shifted_group_attention", q, k, v, mask_mode)
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 tokens, got {group_size}")
    (_, T, H, _), Hkv = q.shape, k.shape[2]
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    options = dict(mask_mode=mode, scale=scale, dropout_p=dropout_p, backend=backend)
    half, shift = H // 2, group_size // 2
    plain = _in_groups(q[:, :, :half], k[:, :, :half], v[:, :, :half], group_size, options)
    qs, ks, vs = q[:, :, half:], k[:, :, half:], v[:, :, half:]
    first = min(group_size - shift, T)  # the shifted heads' first group: positions p with p + G // 2 < G
    shifted = torch.cat([_in_groups(qs[:, :first], ks[:, :first], vs[:, :first], group_size, options),
                         _in_groups(qs[:, first:], ks[:, first:], vs[:, first:], group_size, options)], dim=1)
    return torch.cat([plain, shifted], dim=2)


def _in_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, options: dict) -> torch.Tensor:
    """`attention` within consecutive groups of `group_size` tokens of `[B, T, H, D]` inputs, the last group
    possibly shorter; `[B, T, H, Dv]`."""
    (B, T, H, _), Dv = q.shape, v.shape[-1]
    if T == 0 or H == 0:
        return q.new_zeros(B, T, H, Dv)
    whole = T // group_size * group_size
    parts = []
    if whole:
        grouped = [t[:, :whole].reshape(B * (whole // group_size), group_size, H, t.shape[-1]) for t in (q, k, v)]
        parts.append(attention(*grouped, **options).reshape(B, whole, H, Dv))
    if whole < T:
        parts.append(attention(q[:, whole:], k[:, whole:], v[:, whole:], **options))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def segment_pair_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    *,
    mask_mode: MaskMode | str = MaskMode.CAUSAL,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """LLP/ECP pairwise segment attention (arXiv 2412.06106 §2.8) computed segment by segment, O(T·m).

    The same operator as `attention(q, k, v, mask_mode="causal", attn_mask=llp_mask(p, p, m))` at positions
    `p = 0 … T − 1` (a test compares them forward and backward): each query attends causally within its segment
    of `m` tokens and to the whole previous segment. The first segment is one causal call; the later whole
    segments are one batched call of `m` queries over a window of `2m` keys, whose bottom-right-aligned causal
    mask is exactly that pattern; a last partial segment is a call of its own, so no padding enters.

    Args:
        q, k, v (Tensor): `[B, T, H, D]`, `[B, T, Hkv, D]`, `[B, T, Hkv, Dv]`.
        segment_len (int): `m ≥ 1`.
        mask_mode (MaskMode | str): the calling layer's base mode, `CAUSAL` or `BIDIRECTIONAL`: the pattern is
            causal itself, so both give this operator (as both do with `llp_mask` as `attn_mask`).
        scale, dropout_p, backend: as `attention`.

    Returns:
        Tensor: `[B, T, H, Dv]` in the dtype of `q`.
    """
    _check_whole_rows("segment_pair_attention", q, k, v, mask_mode)
    if segment_len < 1:
        raise ValueError(f"segment_len must be a positive number of tokens, got {segment_len}")
    (B, T, H, _), Dv, m = q.shape, v.shape[-1], segment_len
    options = dict(mask_mode=MaskMode.CAUSAL, scale=scale, dropout_p=dropout_p, backend=backend)
    first = min(m, T)
    parts = [attention(q[:, :first], k[:, :first], v[:, :first], **options)]
    n = T // m  # whole segments
    if n >= 2:
        qs = q[:, m:n * m].reshape(B * (n - 1), m, H, q.shape[-1])
        windows = []
        for t in (k, v):  # segment j's keys: segments j − 1 and j, side by side
            seg = t[:, :n * m].unflatten(1, (n, m))  # (B, n, m, Hkv, ·)
            windows.append(torch.cat([seg[:, :-1], seg[:, 1:]], dim=2).flatten(0, 1))  # (B·(n−1), 2m, Hkv, ·)
        parts.append(attention(qs, *windows, **options).reshape(B, (n - 1) * m, H, Dv))
    if n >= 1 and n * m < T:  # the last, partial segment and the whole one before it
        parts.append(attention(q[:, n * m:], k[:, (n - 1) * m:], v[:, (n - 1) * m:], **options))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_mode: MaskMode | str = MaskMode.BIDIRECTIONAL,
    soft_mask_a: float | torch.Tensor = 0.0,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference for `attention` (same arguments and layouts), written for clarity, computed in float64.

    Repeats the key/value heads, builds the full `[B, H, T, S]` mask, and applies each operator's formula
    literally. Used by the tests only; `dropout_p` must be 0.

    Returns:
        Tensor: `[B, T, H, Dv]` in the dtype of `q`.
    """
    if dropout_p != 0.0:
        raise ValueError("attention_ref is deterministic: dropout_p must be 0")
    _check_shapes(q, k, v)
    mode = MaskMode(mask_mode)
    (B, T, H, D), S, Hkv = q.shape, k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qd = q.double().transpose(1, 2)  # (B, H, T, D)
    kd = k.double().repeat_interleave(H // Hkv, dim=2).transpose(1, 2)  # (B, H, S, D)
    vd = v.double().repeat_interleave(H // Hkv, dim=2).transpose(1, 2)  # (B, H, S, Dv)
    logits = qd @ kd.transpose(-1, -2) * scale  # (B, H, T, S)

    allowed = torch.ones(B, H, T, S, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    causal = causal_mask(T, S, q.device)
    a = torch.as_tensor(soft_mask_a, dtype=torch.float64, device=q.device)
    gain = a + (1 - a) * causal.double()
    if mode is MaskMode.CAUSAL:
        allowed = allowed & causal
    elif mode is MaskMode.SOFT_CAUSAL:
        logits = logits + gain.log()
        allowed = allowed & (gain > 0)

    logits = logits.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    weights = torch.where(has_key, logits, 0.0).softmax(-1) * has_key
    if mode is MaskMode.ILLAMA_SOFT:
        weights = weights * gain
    return (weights @ vd).transpose(1, 2).to(q.dtype)
