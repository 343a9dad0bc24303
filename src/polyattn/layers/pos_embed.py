"""Absolute position embeddings: fixed sin-cos tables over N-D grids, learned tables, and grid resampling.

Token layout: `[prefix…, grid tokens in raster order]` (ViT, class token first) or `[grid tokens…, prefix]`
(iLLaMA, class token after the sequence, `prefix_at_end=True`). Embeddings are `[1, N_prefix + prod(grid), D]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def sincos_pos_embed(grid_shape: tuple[int, ...], dim: int, *, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos embedding `[prod(grid_shape), dim]` of a grid in raster order (float32).

    The N-D generalisation of MAE's 2-D table (arXiv 2111.06377): the channels are split into one block of
    `dim / N` per axis, axis 0 first; each block is `[sin(p·ω), cos(p·ω)]` with `ω_i = temperature^(−i/(d/2))`
    for the axis coordinate `p`. MAE's own 2-D table puts the column (width) block first, i.e. equals this one
    with the blocks swapped.

    Args:
        grid_shape (tuple[int, ...]): the grid, e.g. `(14, 14)`.
        dim (int): embedding width; must be a multiple of `2 · len(grid_shape)`.
        temperature (float): frequency base. Default: 10000.0.
    """
    n_axes = len(grid_shape)
    if n_axes == 0 or dim % (2 * n_axes):
        raise ValueError(f"sin-cos embedding width {dim} must be a multiple of 2 x {n_axes} axes")
    half = dim // n_axes // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float64) / half)  # (d/2,)
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid_shape], indexing="ij")
    blocks = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega  # (N, d/2)
        blocks += [angles.sin(), angles.cos()]
    return torch.cat(blocks, dim=-1).float()


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, ...],
    old_grid: tuple[int, ...],
    *,
    num_prefix_tokens: int = 1,
    prefix_at_end: bool = False,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resamples an absolute position embedding to a new grid, keeping the special-token slots.

    Used when a checkpoint trained at one resolution is loaded at another (timm #908). The grid part is
    interpolated in float32 (bicubic for 2-D grids; linear / trilinear for 1-D / 3-D grids); the prefix slots
    (class and register tokens) are copied unchanged and kept where they were.

    Args:
        pos_embed (Tensor): `[1, N_prefix + prod(old_grid), D]`.
        new_grid (tuple[int, ...]): target grid, e.g. `(24, 24)`.
        old_grid (tuple[int, ...]): grid of `pos_embed`, e.g. `(14, 14)`.
        num_prefix_tokens (int): special-token slots. Default: 1.
        prefix_at_end (bool): the slots follow the grid tokens (iLLaMA's post-sequence class token) instead of
            preceding them (ViT). Default: False.
        interpolation (str): `F.interpolate` mode for 2-D grids. Default: "bicubic".
        antialias (bool): anti-alias when shrinking a 2-D grid (as timm). Default: True.

    Returns:
        Tensor: `[1, N_prefix + prod(new_grid), D]` in the dtype of `pos_embed`.
    """
    new_grid, old_grid = tuple(int(n) for n in new_grid), tuple(int(n) for n in old_grid)
    n_grid = math.prod(old_grid)
    if pos_embed.ndim != 3 or pos_embed.shape[1] != num_prefix_tokens + n_grid:
        raise UserError(f"Position embedding of shape {list(pos_embed.shape)} does not hold {num_prefix_tokens} "
                        f"prefix tokens plus a {'x'.join(map(str, old_grid))} grid; check the checkpoint's "
                        f"image/patch size and number of prefix tokens.")
    if len(new_grid) != len(old_grid) or len(old_grid) not in (1, 2, 3):
        raise ValueError(f"cannot resample a {len(old_grid)}-D grid to a {len(new_grid)}-D grid")
    if new_grid == old_grid:
        return pos_embed
    if prefix_at_end:
        grid, prefix = pos_embed[:, :n_grid], pos_embed[:, n_grid:]
    else:
        prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, D).movedim(-1, 1)  # (1, D, *old_grid)
    if len(old_grid) == 2:
        grid = F.interpolate(grid, size=new_grid, mode=interpolation, align_corners=False, antialias=antialias)
    else:
        mode = "linear" if len(old_grid) == 1 else "trilinear"
        grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    grid = grid.movedim(1, -1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat((grid, prefix) if prefix_at_end else (prefix, grid), dim=1)


class LearnedPosEmbed(nn.Module):
    """A learned absolute position embedding for prefix tokens plus a grid, added to the tokens.

    The table is built for `grid_size`; `forward` resamples it on the fly for another grid (resolution
    changes at inference), and `resize` resamples the stored parameter (fine-tuning at a new resolution).
    Init: trunc-normal, std 0.02 (ViT, iLLaMA), or the sin-cos table when `init="sincos"` (MAE).

    Args:
        grid_size (tuple[int, ...]): grid the table is built for, e.g. `(14, 14)`.
        dim (int): embedding width `D`.
        num_prefix_tokens (int): special-token slots (class/register tokens). Default: 0.
        prefix_at_end (bool): the slots come after the grid tokens (iLLaMA). Default: False.
        init (str): "trunc_normal" or "sincos" (prefix slots zero). Default: "trunc_normal".
    """

    def __init__(self, grid_size: tuple[int, ...], dim: int, *, num_prefix_tokens: int = 0,
                 prefix_at_end: bool = False, init: str = "trunc_normal"):
        super().__init__()
        self.grid_size = tuple(int(n) for n in grid_size)
        self.num_prefix_tokens, self.prefix_at_end = num_prefix_tokens, prefix_at_end
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + math.prod(self.grid_size), dim))
        if init == "trunc_normal":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif init == "sincos":
            n = math.prod(self.grid_size)
            table = sincos_pos_embed(self.grid_size, dim)
            with torch.no_grad():
                grid = self.pos_embed[:, :n] if prefix_at_end else self.pos_embed[:, num_prefix_tokens:]
                grid.copy_(table[None])
        else:
            raise ValueError(f"unknown init {init!r}; expected 'trunc_normal' or 'sincos'")

    def embedding(self, grid_size: tuple[int, ...] | None = None) -> torch.Tensor:
        """The table `[1, N_prefix + prod(grid_size), D]`, resampled when `grid_size` differs from the stored one."""
        if grid_size is None:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, grid_size, self.grid_size,
                                      num_prefix_tokens=self.num_prefix_tokens, prefix_at_end=self.prefix_at_end)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Adds the embedding to tokens `x` `[B, N_prefix + prod(grid_size), D]`."""
        return x + self.embedding(grid_size).to(x.dtype)

    @torch.no_grad()
    def resize(self, grid_size: tuple[int, ...]) -> None:
        """Replaces the stored table by its resampling to `grid_size` (e.g. before fine-tuning at 384 px)."""
        self.pos_embed = nn.Parameter(self.embedding(grid_size).clone())
        self.grid_size = tuple(int(n) for n in grid_size)

    def extra_repr(self) -> str:
        return (f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"prefix_at_end={self.prefix_at_end}")
