"""LRPE and MD-LRPE: linearised relative positional encodings for linear attention.

arXiv 2405.21022 (LightNet) §MD-LRPE; spec shared/reference/lightnet.md §4.1; frequencies and the channel split
follow the author's `xopes/ops/lrpe/cosine/_md` (cosine form) code.

Position-dependent unitary maps on queries and keys make `q_s · k_t` depend on `s − t` only and still factorise,
so they work inside linear attention. For a grid with k axes, each axis owns a contiguous block of channels
(`e = ceil(d / k)` channels each); channel `i` of axis `a` turns at angle `p_a θ_i`. Leading special tokens (class
or condition tokens) get angle 0 (the coordinates are `polyattn.ops.sequence.grid_positions`). Layout
`[B, T, H, d]`; angles `[B|1, T, H, d]` (cosine) or `[B|1, T, H, d/2]` (rotary, one angle per channel pair
`(2j, 2j+1)`).
"""

import math

import torch

from .checks import check_float


def lrpe_theta(
    dim: int, num_heads: int, num_axes: int = 1, base: float = 10000.0, shared_across_heads: bool = False
) -> torch.Tensor:
    """Frequencies `[H, e]`, `e = ceil(dim / num_axes)`: the channels one axis owns.

    Default: one global spectrum split across heads, `θ_{h,i} = base^{−(h·e + i)/(H·e)}` (the author's 2-D code);
    `shared_across_heads=True`: `θ_i = base^{−i/e}` for every head.
    """
    e = math.ceil(dim / num_axes)
    if shared_across_heads:
        return base ** (-torch.arange(e, dtype=torch.float64) / e).expand(num_heads, e).float()
    idx = torch.arange(num_heads * e, dtype=torch.float64).view(num_heads, e)
    return (base ** (-idx / (num_heads * e))).float()


def md_lrpe_angles(positions: torch.Tensor, theta: torch.Tensor, dim: int) -> torch.Tensor:
    """Angles `Θ = concat(p_1 θ, …, p_k θ)[:dim]` per head: `[..., T, k]`, `[H, e]` → `[..., T, H, dim]`."""
    ang = positions.float()[..., None, :, None] * theta.to(positions.device)[:, None, :]  # [..., T, H, k, e]
    return ang.flatten(-2)[..., :dim]


def lrpe_cosine(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Cosine LRPE, `[x ⊙ cos Θ, x ⊙ sin Θ]`: `[B, T, H, d]` → `[B, T, H, 2d]`.

    `T(q, s) · T(k, t) = Σ_i q_i k_i cos((Θ_s − Θ_t)_i)`. Applied to a normalised key weight it is a per-channel
    multiplier (`lrpe_key_features`), so each channel's cos and sin copies share that channel's decay.
    """
    check_float("lrpe_cosine", x=x, angles=angles)
    return torch.cat([x * torch.cos(angles), x * torch.sin(angles)], dim=-1).to(x.dtype)


def lrpe_key_features(angles: torch.Tensor) -> torch.Tensor:
    """`[cos Θ, sin Θ]` (`[..., 2d]`): the key-side multipliers for `polyattn.ops.lightnet.lightnet_attn`."""
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    check_float("lrpe_rotary", x=x, angles=angles)
    if x.shape[-1] % 2:
        raise ValueError(f"lrpe_rotary: x needs an even number of channels (pairs), got {x.shape[-1]}")
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def lrpe_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary LRPE: rotate channel pairs `(2j, 2j+1)` by `Θ_j`; `[B, T, H, d]`, angles `[.., d/2]` → `[B, T, H, d]`."""
    return _rotate_pairs(x, angles).to(x.dtype)


def lrpe_rotary_query(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Query side of rotary LRPE for an op that multiplies keys by `lrpe_key_features` (d → 2d).

    With `y = R(Θ_t) q` and the pair angle repeated on both channels of a pair,
    `y · R(Θ_s) w = Σ_j y_j w_j cos Θ_sj + Σ_j ỹ_j w_j sin Θ_sj`, where `ỹ = (y_2, −y_1)` per pair. So the
    rotary score `(R_t q) · (R_s w)` becomes `[y, ỹ] · [w ⊙ cos Θ_s, w ⊙ sin Θ_s]`: with LightNet's causal vector
    decay folded into `w` this keeps relative positions exact (spec §4.1 notes that rotating the keys *before*
    the per-channel decay breaks it); in the non-causal form it equals plain rotary on q and softmax(K).
    """
    y = _rotate_pairs(x, angles)
    y_tilde = torch.stack([y[..., 1::2], -y[..., 0::2]], dim=-1).flatten(-2)
    return torch.cat([y, y_tilde], dim=-1).to(x.dtype)


def pair_angles_to_channels(angles: torch.Tensor) -> torch.Tensor:
    """Rotary pair angles `[..., d/2]` → per-channel angles `[..., d]` (each pair's angle on both channels)."""
    return angles.repeat_interleave(2, dim=-1)
