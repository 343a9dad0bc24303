"""LightNet layers: the LightNet attention token mixer, MD-TPE, the pre-norm block, and the multi-scan baseline.

arXiv 2405.21022 (Qin et al., LightNet); spec shared/reference/lightnet.md §3–§5.

Both mixers follow the token-mixer interface of `polyattn.layers.mixer` (softmax `Attention`'s call form):
`forward(x [B, T, D], *, key_padding_mask [B, T] | None, cache, use_cache, grid_shape) -> (o [B, T, D], cache)`.
Only 2-D padding masks are accepted (True/1 = real token). `cache` is *this layer's own* decoding state (a
`LightNetCache`, not a multi-layer cache object): a model keeps one per layer and passes it back in; nothing is
stored on the module. The string options of the constructors are enums, parsed once when the layer is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, parse_enum
from ..ops.checks import check_features, check_mask
from ..ops.decay_scan import multi_scan_decay_attn
from ..ops.lightnet import LightNetState, lightnet_attn
from ..ops.lrpe import (
    lrpe_cosine,
    lrpe_key_features,
    lrpe_rotary_query,
    lrpe_theta,
    md_lrpe_angles,
    pair_angles_to_channels,
)
from ..ops.sequence import grid_positions, real_counts, real_positions
from ..ops.tpe import tpe_axis_scan, tpe_scan
from .drop import DropPath
from .init import init_linear
from .mixer_hooks import call_op
from .mlp import GatedMlp
from .norm import GroupRMSNorm, RMSNorm


class Lrpe(str, Enum):
    """MD-LRPE form of `LightNetAttention` (None = no relative positions)."""

    COSINE = "cosine"  # d → 2d channels (cos, sin), exact under the causal decay
    ROTARY = "rotary"  # rotation of the query, carried in the same 2d state so it stays exact


class GatePosition(str, Enum):
    """Where the output gate sits relative to the per-head RMSNorm."""

    PRE = "pre"  # the author's: norm(o ⊙ σ(u))
    POST = "post"  # norm(o) ⊙ σ(u)


class NormalizerInit(str, Enum):
    """Initial log-normaliser of the LightNet softmax (see `polyattn.ops.lightnet.lightnet_attn`)."""

    EMPTY = "empty"  # z₀ = −inf: a plain softmax over the keys seen
    UNIT = "unit"  # z₀ = 0: one extra virtual key of logit 0 and value 0 (the author's LM code)


class MixerInit(str, Enum):
    """Initialisation of a mixer's linear layers."""

    DEFAULT = "default"  # trunc-normal, std 0.02, zero biases
    AUTHOR = "author"  # Xavier-uniform gain 0.01, the output projection zeroed (the author's code)


def parse_lrpe(lrpe: Lrpe | str | None) -> Lrpe | None:
    """`Lrpe` from a member or its string; None = no LRPE."""
    return None if lrpe is None else parse_enum(Lrpe, lrpe, "lrpe")


class LightNetCache(NamedTuple):
    """Decoding state of one `LightNetAttention` layer.

    Attributes:
        S: running matrix `[B, H, R·d, d]` float32 (R = 2 with LRPE, else 1), normalised to `z`.
        z: log-normaliser `[B, H, d]` float32 (−inf = no key yet).
        offset: `[B]` int64, real tokens seen so far: the LRPE position of the next real token.
    """

    S: torch.Tensor
    z: torch.Tensor
    offset: torch.Tensor


def _init_linears(module: nn.Module, init: MixerInit, zero: Sequence[nn.Linear] = ()) -> None:
    """`DEFAULT`: trunc-normal(0.02) for every linear; `AUTHOR`: Xavier-uniform gain 0.01, listed layers zeroed."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if init is MixerInit.DEFAULT:
                nn.init.trunc_normal_(m.weight, std=0.02)
            else:
                nn.init.xavier_uniform_(m.weight, gain=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if init is MixerInit.AUTHOR:
        for m in zero:
            nn.init.zeros_(m.weight)


class LightNetAttention(nn.Module):
    """LightNet attention (LNA) layer, spec §3.1 (arXiv 2405.21022).

    `q = SiLU(W_q x)`, raw key logits `k = W_k x`, `v = W_v x`; keys soft-maxed over tokens (causal: over the
    prefix) inside `polyattn.ops.lightnet.lightnet_attn`; MD-LRPE on q and on the normalised keys; a low-rank
    sigmoid output gate `σ(W_u2 W_u1 x)`; per-head RMSNorm; output projection.

    Args:
        hidden_size: model width D.
        num_heads: H; head dim d = D / H for keys and values.
        causal: causal (LM) or global one-scan (encoders, images) mixing.
        scale: output scale of the core; 1.0 (the authors') or None for d^-0.5.
        lrpe: `Lrpe` or its string: "cosine" (d → 2d, exact under the causal decay), "rotary" (carried in the same
            2d state so it stays exact, see `lrpe_rotary_query`), or None.
        grid_shape: default grid (e.g. `(14, 14)`) for MD-LRPE over grid tokens; None = 1-D positions that count
            real tokens. A forward call may pass another `grid_shape`.
        num_special: leading special tokens (angle 0) before the grid tokens.
        lrpe_base, lrpe_shared_heads: LRPE frequencies (`polyattn.ops.lrpe.lrpe_theta`).
        gate_low_rank_dim: rank r of the output gate; None → d.
        gate_position: `GatePosition`: "pre" (author: `norm(o ⊙ σ(u))`) or "post" (`norm(o) ⊙ σ(u)`).
        norm_eps: eps of the per-head RMSNorm.
        normalizer_init: `NormalizerInit`: "empty" or "unit" (see `lightnet_attn`).
        chunk_size: chunk length of the causal parallel form.
        init: `MixerInit`: "default" (trunc-normal 0.02) or "author" (Xavier gain 0.01, zero o_proj).
        kernel_backend: the causal chunked core: "torch" or a `polyattn.ops.gla_backends` name.

    Options that cannot apply are refused when the layer is built: a grid or special tokens without LRPE (they
    only place LRPE angles), and a `kernel_backend` other than "torch" in the global form (it has one kernel).
    """

    BUILD_ARGS: ClassVar[tuple[str, ...]] = ("causal", "grid_shape")
    """Constructor arguments that `build` sets (see `polyattn.layers.mixer`)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        causal: bool = True,
        scale: float | None = 1.0,
        lrpe: Lrpe | str | None = Lrpe.COSINE,
        grid_shape: Sequence[int] | None = None,
        num_special: int = 0,
        lrpe_base: float = 10000.0,
        lrpe_shared_heads: bool = False,
        gate_low_rank_dim: int | None = None,
        gate_position: GatePosition | str = GatePosition.PRE,
        norm_eps: float = 1e-6,
        normalizer_init: NormalizerInit | str = NormalizerInit.EMPTY,
        chunk_size: int = 64,
        init: MixerInit | str = MixerInit.DEFAULT,
        kernel_backend: str = "torch",
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.lrpe = parse_lrpe(lrpe)
        self.gate_position = parse_enum(GatePosition, gate_position, "gate_position")
        self.normalizer_init = parse_enum(NormalizerInit, normalizer_init, "normalizer_init")
        init = parse_enum(MixerInit, init, "init")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        if self.lrpe is Lrpe.ROTARY and d % 2:
            raise ValueError("rotary LRPE needs an even head dim")
        if self.lrpe is None and (grid_shape is not None or num_special):
            raise UserError("grid_shape and num_special place MD-LRPE angles, and this layer has lrpe=None; "
                            "drop them or choose an lrpe.")
        if kernel_backend != "torch" and not causal:
            raise UserError(f"kernel_backend {kernel_backend!r} runs the causal chunked form only; the global "
                            "form (causal=False) has one kernel, so leave kernel_backend at 'torch'.")
        self.causal = causal
        self.scale = d**-0.5 if scale is None else scale
        self.grid_shape = tuple(grid_shape) if grid_shape is not None else None
        self.num_special = num_special
        self.chunk_size = chunk_size
        self.kernel_backend = kernel_backend
        self.lrpe_base, self.lrpe_shared_heads = lrpe_base, lrpe_shared_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        r = gate_low_rank_dim or d
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, r, bias=False), nn.Linear(r, hidden_size, bias=False))
        self.g_norm = GroupRMSNorm(hidden_size, num_heads, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        _init_linears(self, init, zero=[self.o_proj])

    @classmethod
    def build(cls, dim: int, num_heads: int, *, causal: bool, grid_shape: Sequence[int] | None = None,
              **options) -> LightNetAttention:
        """The token-mixer constructor (`polyattn.layers.mixer`). The grid places MD-LRPE angles; a layer without
        LRPE does not take one."""
        lrpe = parse_lrpe(options.get("lrpe", Lrpe.COSINE))
        return cls(dim, num_heads, causal=causal, grid_shape=grid_shape if lrpe is not None else None, **options)

    def _theta(self, num_axes: int, device) -> torch.Tensor:
        dim = self.head_dim if self.lrpe is Lrpe.COSINE else self.head_dim // 2
        return lrpe_theta(dim, self.num_heads, num_axes, self.lrpe_base, self.lrpe_shared_heads).to(device)

    def _positions(self, B, T, mask, offset, grid_shape, device) -> torch.Tensor:
        """LRPE coordinates `[B|1, T, k]`."""
        if grid_shape is not None:
            if offset is not None:
                raise ValueError("decoding over a grid is not supported; use 1-D positions")
            pos = grid_positions(grid_shape, self.num_special, device=device)
            if not (pos.shape[0] == T):
                raise ValueError(f"grid {tuple(grid_shape)} + {self.num_special} specials != {T} tokens")
            return pos[None]
        start = 0 if offset is None else offset
        return real_positions(mask, T, start=start, batch_size=B, device=device).float()[..., None]

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cache: LightNetCache | None = None,
        use_cache: bool = False,
        grid_shape: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, LightNetCache | None]:
        """`x [B, T, D]` → `(o [B, T, D], cache)`, the token-mixer call form (`polyattn.layers.mixer`).

        Args:
            key_padding_mask: `[B, T]` bool, True = real token.
            cache: this layer's state from a previous call (causal layers only); the new tokens continue it.
            use_cache: return the new state even when no `cache` was passed.
            grid_shape: the grid of the tokens for MD-LRPE; None = the layer's own (1-D positions when it has none).

        Returns the new `LightNetCache` when `cache` was passed or `use_cache` is set, else None. Packed sequences
        (`cu_seqlens`) are not taken, because LRPE positions and the state would have to restart at every
        boundary; unpack to a padded batch with a padding mask (as `LightNetLM` does).
        """
        check_features("LightNetAttention", x, self.hidden_size, "x")
        check_mask("LightNetAttention", key_padding_mask, *x.shape[:2], "key_padding_mask")
        if not (cache is None or self.causal):
            raise ValueError("a decoding state needs a causal layer")
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        mask = None if key_padding_mask is None else key_padding_mask.bool()
        grid_shape = self.grid_shape if grid_shape is None else grid_shape
        want_state = use_cache or cache is not None
        q = F.silu(self.q_proj(x)).view(B, T, H, d)  # [B, T, H, d]
        k = self.k_proj(x).view(B, T, H, d)  # raw key logits: the key is the decay input
        v = self.v_proj(x).view(B, T, H, d)
        offset = None if cache is None else cache.offset
        feats = None
        if self.lrpe is not None:
            pos = self._positions(B, T, mask, offset, grid_shape, x.device)
            theta = self._theta(pos.shape[-1], x.device)
            if self.lrpe is Lrpe.COSINE:
                ang = md_lrpe_angles(pos, theta, d)  # [B|1, T, H, d]
                q = lrpe_cosine(q, ang)
            else:
                pair = md_lrpe_angles(pos, theta, d // 2)
                ang = pair_angles_to_channels(pair)
                q = lrpe_rotary_query(q, pair)
            feats = lrpe_key_features(ang)
        state = None if cache is None else LightNetState(cache.S, cache.z)
        o, new_state = call_op(self, lightnet_attn, q, k, v, causal=self.causal, scale=self.scale,
                               initial_state=state, output_final_state=want_state, mask=mask,
                               chunk_size=self.chunk_size, normalizer_init=self.normalizer_init.value,
                               key_features=feats, backend=self.kernel_backend)
        o = o.reshape(B, T, D)
        gate = torch.sigmoid(self.g_proj(x))
        o = self.g_norm(o * gate) if self.gate_position is GatePosition.PRE else self.g_norm(o) * gate
        o = self.o_proj(o)
        new_cache = None
        if want_state:
            seen = real_counts(mask, T, batch_size=B, device=x.device) + (0 if offset is None else offset)
            new_cache = LightNetCache(new_state.S, new_state.z, seen)
        return o, new_cache

    def state_size(self) -> int:
        """Floats per sequence in the decoding state: `S` (H·R·d·d) + `z` (H·d) (+ the position counter)."""
        R = 1 if self.lrpe is None else 2
        return self.num_heads * (R * self.head_dim * self.head_dim + self.head_dim) + 1


class MdTpe(nn.Module):
    """MD-TPE (spec §4.2–4.3; arXiv 2405.21022): one decayed Toeplitz scan per grid axis, summed.

    Per axis `a` and head `h`: `u = scan_a(x)` with decay `λ_{a,h} = sigmoid(ℓ_{a,h})`, `o = c_{a,h} u` with
    `c_{a,h} = q_{a,h} · k_{a,h}`, `y_a = W_{o,a} GroupRMSNorm_H(o)`; `MD-TPE(x) = Σ_a y_a`.

    Args:
        dim: width D.
        num_heads: H (channels per head D / H share one decay).
        num_axes: number of grid axes (1 for text).
        causal: one-sided scans (causal LMs) or two-sided `λ^{|Δ|}` per axis (encoders, images).
        residual: return `x + MD-TPE(x)` (recommended) or `MD-TPE(x)` (the author's LM code replaces the embedding).
        num_special: leading special tokens, excluded from the scans and passed through unchanged.
        norm_eps: eps of the per-axis group RMSNorm.
    """

    def __init__(self, dim: int, num_heads: int, num_axes: int = 1, *, causal: bool = False, residual: bool = True,
                 num_special: int = 0, norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_axes = dim, num_heads, num_axes
        self.causal, self.residual, self.num_special = causal, residual, num_special
        self.q = nn.Parameter(torch.ones(num_axes, dim))
        self.k = nn.Parameter(torch.ones(num_axes, dim))
        self.decay_logit = nn.Parameter(torch.zeros(num_axes, num_heads))  # λ = 0.5 at init
        self.norms = nn.ModuleList(GroupRMSNorm(dim, num_heads, eps=norm_eps) for _ in range(num_axes))
        self.o_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_axes))
        for m in self.o_projs:
            init_linear(m)

    def forward(
        self,
        x: torch.Tensor,
        grid_shape: Sequence[int] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x [B, l + N, D]` → `(y [B, l + N, D], cache)`, with the names of the token-mixer call form.

        `grid_shape` defaults to `(N,)` (1-D). `key_padding_mask [B, T]` (True = real): padded inputs are zeroed
        (left padding causal / right padding two-sided are exact) and padded outputs pass through. `cache
        [B, H, D/H]` float32 is the causal 1-D scan state for decoding (returned when `use_cache`).
        """
        B, T, D = x.shape
        H = self.num_heads
        ls = self.num_special
        tokens = x[:, ls:]
        grid_shape = (T - ls,) if grid_shape is None else tuple(grid_shape)
        if not (len(grid_shape) == self.num_axes):
            raise ValueError(f"grid {grid_shape} has not {self.num_axes} axes")
        m = None if key_padding_mask is None else key_padding_mask.bool()[:, ls:, None]
        xin = tokens if m is None else tokens.masked_fill(~m, 0)
        xh = xin.reshape(B, T - ls, H, D // H)
        log_decay = F.logsigmoid(self.decay_logit.float())  # [A, H]
        coeff = (self.q * self.k).view(self.num_axes, H, D // H).sum(-1)  # c_{a,h} = q_{a,h} · k_{a,h}
        direction = "causal" if self.causal else "bidirectional"
        out, new_cache = 0, None
        for a in range(self.num_axes):
            if self.num_axes == 1 and self.causal:
                u, new_cache = tpe_scan(xh, log_decay[a], direction="causal", initial_state=cache)
            else:
                if not (cache is None and not use_cache):
                    raise ValueError("a decoding state exists for the 1-D causal TPE only")
                u = tpe_axis_scan(xh, grid_shape, a, log_decay[a], direction=direction)
            o = (u * coeff[a][:, None].to(u.dtype)).reshape(B, T - ls, D)
            out = out + self.o_projs[a](self.norms[a](o))
        if m is not None:
            out = out.masked_fill(~m, 0)
        y = tokens + out if self.residual else out
        if m is not None and not self.residual:
            y = torch.where(m, y, tokens)
        y = torch.cat([x[:, :ls], y], dim=1)
        return y, (new_cache if use_cache else None)


class MultiScanAttention(nn.Module):
    """The multiplicative multi-scan baseline with the same shape as `LightNetAttention` (spec §5).

    Same q/k/v/gate/norm/output parts; instead of LightNet's soft-maxed keys, a per-channel log-decay
    `g = logsigmoid(W_f2 W_f1 x)` (low rank, like the gate) drives `S_t = diag(λ_t) S_{t−1} + (1 − λ_t) k_t v_tᵀ`,
    run as causal scans over `directions` orders of the grid (1: row-major; 2: + reversed (Vim); 4: + column-major
    both ways (VMamba cross-scan)) and summed (or averaged, `divide=True`).

    Args:
        hidden_size, num_heads: as `LightNetAttention`.
        directions: 1, 2 or 4.
        grid_shape: grid of the tokens (needed for 4 directions); None → 1-D.
        divide: average the directions instead of summing.
        per_direction_decay: a separate decay projection per direction (default: shared).
        scale: query scale; None → d^-0.5.
        gate_low_rank_dim, decay_low_rank_dim: ranks; None → d.
        norm_eps, chunk_size, init: as `LightNetAttention`.

    Not causal (every direction but the first runs against the token order), so it has no decoding state:
    `build(causal=True)` and a `cache` are refused.
    """

    BUILD_ARGS: ClassVar[tuple[str, ...]] = ("grid_shape",)
    """Constructor arguments that `build` sets (see `polyattn.layers.mixer`)."""
    causal: ClassVar[bool] = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        directions: int = 4,
        grid_shape: Sequence[int] | None = None,
        divide: bool = False,
        per_direction_decay: bool = False,
        scale: float | None = None,
        gate_low_rank_dim: int | None = None,
        decay_low_rank_dim: int | None = None,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        init: MixerInit | str = MixerInit.DEFAULT,
    ):
        super().__init__()
        init = parse_enum(MixerInit, init, "init")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if directions not in (1, 2, 4):
            raise ValueError(f"directions must be 1, 2 or 4, got {directions}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.directions, self.divide, self.scale = directions, divide, scale
        self.grid_shape = tuple(grid_shape) if grid_shape is not None else None
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        rf = decay_low_rank_dim or d
        n_f = directions if per_direction_decay else 1
        self.f_projs = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_size, rf, bias=False), nn.Linear(rf, hidden_size, bias=True))
            for _ in range(n_f))
        r = gate_low_rank_dim or d
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, r, bias=False), nn.Linear(r, hidden_size, bias=False))
        self.g_norm = GroupRMSNorm(hidden_size, num_heads, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        _init_linears(self, init, zero=[self.o_proj])
        for f in self.f_projs:  # start with slow decay (λ ≈ sigmoid(3) ≈ 0.95): long memory, as GLA-style models
            nn.init.constant_(f[1].bias, 3.0)

    @classmethod
    def build(cls, dim: int, num_heads: int, *, causal: bool, grid_shape: Sequence[int] | None = None,
              **options) -> MultiScanAttention:
        """The token-mixer constructor (`polyattn.layers.mixer`); bidirectional models only."""
        if causal:
            raise UserError("MultiScanAttention is not causal (its scans run in several directions over the "
                            "grid); use it in a bidirectional model or choose a causal mixer.")
        return cls(dim, num_heads, grid_shape=grid_shape, **options)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cache: None = None,
        use_cache: bool = False,
        grid_shape: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, None]:
        """`x [B, T, D]` → `(o [B, T, D], None)`, the token-mixer call form (`polyattn.layers.mixer`); no decoding
        state (a multi-direction scan is not causal). `grid_shape` overrides the layer's own (None → 1-D)."""
        if not (cache is None and not use_cache):
            raise ValueError("MultiScanAttention has no decoding state")
        check_features("MultiScanAttention", x, self.hidden_size, "x")
        check_mask("MultiScanAttention", key_padding_mask, *x.shape[:2], "key_padding_mask")
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        grid_shape = self.grid_shape if grid_shape is None else grid_shape
        grid_shape = (T,) if grid_shape is None else tuple(grid_shape)
        q = F.silu(self.q_proj(x)).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H, d)
        v = self.v_proj(x).view(B, T, H, d)
        gs = [F.logsigmoid(f(x).float()).view(B, T, H, d) for f in self.f_projs]
        mask = None if key_padding_mask is None else key_padding_mask.bool()
        o = call_op(self, multi_scan_decay_attn, q, k, v, gs[0] if len(gs) == 1 else gs, grid_shape=grid_shape,
                    directions=self.directions, divide=self.divide, scale=self.scale, mask=mask,
                    chunk_size=self.chunk_size)
        o = o.reshape(B, T, D)
        o = self.o_proj(self.g_norm(o * torch.sigmoid(self.g_proj(x))))
        return o, None


class LightNetBlock(nn.Module):
    """Pre-norm block (spec §3.4): `h ← h + Mixer(RMSNorm(h))`, `h ← h + GLU(RMSNorm(h))`.

    Args:
        dim: width D.
        mixer: the token mixer, already built (any `polyattn.layers.mixer` mixer: `LightNetAttention`,
            `MultiScanAttention`, softmax `Attention`, ...; see `build_mixer`).
        mlp_hidden_dim: GLU hidden width; None → 8D/3 rounded up to a multiple of 8 (a ViT 4× MLP budget).
        norm_eps: eps of the two RMSNorms.
        drop_path: stochastic-depth probability of both residual branches.
    """

    def __init__(self, dim: int, mixer: nn.Module, *, mlp_hidden_dim: int | None = None, norm_eps: float = 1e-6,
                 drop_path: float = 0.0):
        super().__init__()
        hidden = mlp_hidden_dim or 8 * math.ceil(8 * dim / 3 / 8)
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = mixer
        self.mlp_norm = RMSNorm(dim, eps=norm_eps)
        self.mlp = GatedMlp(dim, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, h: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, cache=None,
                use_cache: bool = False, grid_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, object]:
        """`[B, T, D]` → `([B, T, D], the mixer's new state or None)`, in the mixer's call form."""
        o, state = self.mixer_branch(h, key_padding_mask=key_padding_mask, cache=cache, use_cache=use_cache,
                                     grid_shape=grid_shape)
        h = h + o
        h = h + self.mlp_branch(h)
        return h, state

    def mixer_branch(self, h: torch.Tensor, **kwargs) -> tuple[torch.Tensor, object]:
        """`(DropPath(Mixer(RMSNorm(h))), the mixer's new state)`: the first residual branch, for a reversible
        stack (`polyattn.layers.reversible`); `kwargs` as `forward`'s, `cache`/`use_cache` included."""
        o, state = self.attn(self.attn_norm(h), **kwargs)
        return self.drop_path(o), state

    def mlp_branch(self, h: torch.Tensor, **_) -> torch.Tensor:
        """`DropPath(GLU(RMSNorm(h)))`, the second residual branch; the GLU takes none of the mixer's options."""
        return self.drop_path(self.mlp(self.mlp_norm(h)))
