"""Rotary position embeddings (RoPE, arXiv 2104.09864), over one axis or over the axes of an N-D grid.

A rotary module maps integer (or float) positions to a `Rotary`: per-token angles stored as `cos`/`sin` tables
over channel pairs. `Rotary.apply(x)` rotates a `[B, T, H, D]` tensor; `Attention` takes a `Rotary` through its
`rope` argument and applies it to the queries and the new keys. Positions are explicit inputs, so cached
decoding passes each row's own positions (see `polyattn.ops.sequence.real_positions` and
`KVCache.next_positions`); grid coordinates come from `polyattn.ops.sequence.grid_positions`.

Channel-pair layouts:

- interleaved (Meta LLaMA, iLLaMA): channels `(2i, 2i + 1)` form one complex number;
- half-split (GPT-NeoX, Hugging Face): channels `(i, i + D/2)` form one complex number.

Released checkpoints only load into the layout they were trained with. The angle tables are computed on the
fly from the positions in float64 (small: `[T, D/2]`), so nothing is stored in the state_dict and a dtype cast
of the model cannot round the frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Rotary:
    """The rotation of a set of tokens: angles per token and channel pair.

    Attributes:
        cos (Tensor): `[T, D/2]` (the same positions for every row) or `[B, T, D/2]`, float32.
        sin (Tensor): same shape as `cos`.
        interleaved (bool): the channel-pair layout (see the module docstring).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotates `x` `[B, T, H, D]`; see `apply_rotary`."""
        return apply_rotary(x, self.cos, self.sin, interleaved=self.interleaved)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = True) -> torch.Tensor:
    """Rotates each channel pair of `x` by its angle, in float32, and casts back to `x.dtype`.

    Args:
        x (Tensor): `[B, T, H, D]`, `D` even.
        cos (Tensor): `[T, D/2]` or `[B, T, D/2]`, the cosine of each token's angle per channel pair.
        sin (Tensor): same shape as `cos`.
        interleaved (bool): pairs `(2i, 2i + 1)` if True, `(i, i + D/2)` if False. Default: True.

    Returns:
        Tensor: `[B, T, H, D]`, the pair `(x₀, x₁)` mapped to `(x₀ cos − x₁ sin, x₀ sin + x₁ cos)`.
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"rotary tables cover {2 * cos.shape[-1]} channels, x has {x.shape[-1]}")
    cos, sin = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # (..., T, 1, D/2): broadcast over heads
    xf = x.float()
    if interleaved:
        x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = xf.chunk(2, dim=-1)
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.to(x.dtype)


def _wide_dtype(device: torch.device) -> torch.dtype:
    # float32 angles are off by ~1e-4 rad at position 1000, so the (small) tables are built in float64,
    # except on MPS, which has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def axial_frequencies(head_dim: int, num_axes: int, base: float, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`freqs [num_axes, D/2]`: `freqs[a, p] = θ_i` if axis `a` owns pair `p` (its `i`-th), else 0.

    Axis `a` owns the pairs `[a·P, (a+1)·P)`, `P = (D/2) // num_axes`, with `θ_i = base^(−2i/(2P))`; with one
    axis this is `θ_i = base^(−2i/D)`. Angles are then `positions @ freqs`.
    """
    pairs = (head_dim // 2) // num_axes
    p = torch.arange(head_dim // 2, device=device)
    theta = base ** (-2.0 * (p % pairs).to(dtype) / (2 * pairs))
    owner = p // pairs  # == num_axes for the unrotated trailing pairs
    return theta * (owner == torch.arange(num_axes, device=device)[:, None])


def _rotary(positions: torch.Tensor, head_dim: int, num_axes: int, base: float, interleaved: bool) -> Rotary:
    """Tables for coordinates `[..., T, num_axes]`; NaN coordinates give angle 0 (no rotation)."""
    wide = _wide_dtype(positions.device)
    freqs = axial_frequencies(head_dim, num_axes, base, positions.device, wide)
    angles = torch.nan_to_num(positions.to(wide), nan=0.0) @ freqs  # (..., T, D/2)
    return Rotary(angles.cos().float(), angles.sin().float(), interleaved)


class RotaryEmbedding(nn.Module):
    """1-D RoPE over token positions, `θ_i = base^(−2i/D)` for the pairs `i = 0 … D/2 − 1`.

    Example:
        >>> rope = RotaryEmbedding(64)
        >>> rot = rope(torch.arange(197))          # positions [T] (or [B, T] for per-row offsets)
        >>> q = rot.apply(q)                        # q [B, T, H, 64]

    Args:
        head_dim (int): channels per head `D` (even); all of them are rotated.
        base (float): frequency base. Default: 10000.0.
        interleaved (bool): channel-pair layout, interleaved (LLaMA, iLLaMA) or half-split (GPT-NeoX).
            Default: True.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = True):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved

    def forward(self, positions: torch.Tensor) -> Rotary:
        """The rotation for `positions` `[T]` or `[B, T]` (int or float; NaN = leave that token unrotated)."""
        return _rotary(positions[..., None], self.head_dim, 1, self.base, self.interleaved)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"


class RotaryEmbeddingND(nn.Module):
    """RoPE over the axes of an N-D grid (axial RoPE): each axis rotates its own block of channel pairs.

    The `D/2` channel pairs are split into `num_axes` contiguous blocks of `P = (D/2) // num_axes` pairs; axis
    `a` owns pairs `[a·P, (a+1)·P)` and rotates them with `θ_i = base^(−2i/(2P))`, `i < P`, times its
    coordinate. The `(D/2) mod num_axes` trailing pairs are left unrotated. The pair layout (interleaved or
    half-split) is the same as in `RotaryEmbedding`.

    Tokens without a grid position (e.g. a class token) are left unrotated by giving them NaN coordinates;
    a NaN on one axis leaves only that axis's channels unrotated.

    Example:
        >>> rope = RotaryEmbeddingND(64, num_axes=2)
        >>> rot = rope(grid_positions((14, 14)))   # positions [T, 2] (or [B, T, 2])

    Args:
        head_dim (int): channels per head `D` (even).
        num_axes (int): number of grid axes; `D/2 ≥ num_axes`.
        base (float): frequency base. Default: 10000.0.
        interleaved (bool): channel-pair layout. Default: True.
    """

    def __init__(self, head_dim: int, num_axes: int, base: float = 10000.0, interleaved: bool = True):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if num_axes < 1 or head_dim // 2 < num_axes:
            raise ValueError(f"head_dim {head_dim} has too few channel pairs for {num_axes} axes")
        self.head_dim, self.num_axes, self.base, self.interleaved = head_dim, num_axes, base, interleaved
        self.pairs_per_axis = (head_dim // 2) // num_axes

    def forward(self, positions: torch.Tensor) -> Rotary:
        """The rotation for coordinates `[T, num_axes]` or `[B, T, num_axes]` (NaN = unrotated on that axis)."""
        if positions.shape[-1] != self.num_axes:
            raise ValueError(f"expected positions [..., T, {self.num_axes}], got {tuple(positions.shape)}")
        return _rotary(positions, self.head_dim, self.num_axes, self.base, self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_axes={self.num_axes}, pairs_per_axis={self.pairs_per_axis}, "
                f"base={self.base}, interleaved={self.interleaved}")

