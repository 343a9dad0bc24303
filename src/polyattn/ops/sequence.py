"""Sequence bookkeeping: token positions from padding masks, documents packed by `cu_seqlens`, grid coordinates.

Pure tensor functions, shared by every layer and model that needs them, so that each concept is written once:

- `real_positions`, `real_counts`, `cat_padding_masks`: a padding mask `[B, T]` (True = real token) and the
  positions it implies. Positions count real tokens only, so a left- or right-padded row gets the positions of its
  unpadded version (RoPE, LRPE and the Perceiver masks all rely on it).
- `check_cu_seqlens`, `document_positions`, `unpack_sequences`, `pack_sequences`: documents packed into one row
  `[1, ΣT]` with `cu_seqlens [N + 1]` offsets (flash-attn's varlen layout), as per-token document indices and
  positions, or as a padded batch `[N, T_max]` and back.
- `grid_positions`: the integer coordinates of the tokens of an N-D grid in raster order (RoPE-ND, MD-LRPE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def real_positions(mask: torch.Tensor | None, length: int | None = None, *, start: int | torch.Tensor = 0,
                   batch_size: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The position of each of `length` tokens: `start` plus the real tokens before it.

    A padding slot repeats the position of the real token before it (0 before the first one); it is never attended,
    so the value does not matter.

    Args:
        mask (Tensor, Optional): `[B, length]` bool, True = real token; None = every token real.
        length (int, Optional): tokens `T` in this call; needed only when `mask` is None.
        start (int | Tensor): real tokens before this call (the next position), an int or one per row `[B]`.
        batch_size (int, Optional): expand the result to `[B, T]` even when nothing in it differs per row.
        device: of the result when `mask` is None.

    Returns:
        Tensor: int64 `[B, T]`, or `[T]` when `mask` is None, `start` an int and `batch_size` None.
    """
    if mask is None:
        if length is None:
            raise ValueError("real_positions needs a padding mask or the number of tokens (length)")
        dev = start.device if isinstance(start, torch.Tensor) else device
        within = torch.arange(length, device=dev)
    else:
        within = (mask.long().cumsum(-1) - 1).clamp_min(0)
    pos = within + (start[:, None] if isinstance(start, torch.Tensor) else start)
    return pos if batch_size is None else pos.expand(batch_size, pos.shape[-1])


def real_counts(mask: torch.Tensor | None, length: int, *, batch_size: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Real tokens per row `[B]` (int64) of a call of `length` tokens with padding `mask [B, length]` (None: all)."""
    if mask is None:
        return torch.full((batch_size,), length, dtype=torch.long, device=device)
    return mask.long().sum(-1)


def cat_padding_masks(a: torch.Tensor | None, b: torch.Tensor | None, shape_a: Sequence[int],
                      shape_b: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor | None:
    """Two padding masks `[B, Ta]`, `[B, Tb]` joined along time; None stands for all real (of `shape_a` / `shape_b`),
    and two Nones give None."""
    if a is None and b is None:
        return None
    a = torch.ones(tuple(shape_a), dtype=torch.bool, device=device) if a is None else a.bool()
    b = torch.ones(tuple(shape_b), dtype=torch.bool, device=device) if b is None else b.bool()
    return torch.cat((a, b), -1)


# ---------------------------------------------------------------------------------------------------------------
# Documents packed into one row: `cu_seqlens [N + 1]` = 0, T_0, T_0 + T_1, …, ΣT
# ---------------------------------------------------------------------------------------------------------------

def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """`cu_seqlens` as int64 offsets after checking that they rise from 0 to the packed length `total`."""
    ok = (isinstance(cu_seqlens, torch.Tensor) and not cu_seqlens.is_floating_point() and cu_seqlens.ndim == 1
          and cu_seqlens.numel() >= 2)
    cu = cu_seqlens.long() if ok else None
    if not ok or cu[0] != 0 or cu[-1] != total or (cu.diff() < 0).any():
        got = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"cu_seqlens must be [N + 1] integer offsets rising from 0 to the packed length {total} "
                         f"of one row (B == 1), got {got}")
    return cu


def document_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For `total` tokens packed by `cu_seqlens [N + 1]`: each token's document index and its position in that
    document, both int64 `[total]` on the device of `cu_seqlens`."""
    cu = check_cu_seqlens(cu_seqlens, total)
    idx = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    return doc, idx - cu[doc]


def unpack_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor, *, left_pad: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences packed into one row `x [1, ΣT, ...]` as a padded batch: `(padded [N, T_max, ...], mask [N, T_max])`.

    Padding slots hold zeros. Right padding (default) aligns the starts of the sequences; `left_pad=True` aligns
    their ends (a model that reads the last columns of a window). `pack_sequences` is the inverse.
    """
    if x.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) come in one row, B == 1; got B = {x.shape[0]}")
    cu = check_cu_seqlens(cu_seqlens.to(x.device), x.shape[1])
    lengths = cu.diff()
    T = int(lengths.max())
    col = torch.arange(T, device=x.device)
    pad = (T - lengths)[:, None] if left_pad else 0  # (N, 1): padding slots before each sequence
    mask = (col[None] >= pad) & (col[None] < pad + lengths[:, None])  # (N, T_max)
    index = (cu[:-1, None] + col[None] - pad).clamp(0, max(x.shape[1] - 1, 0))  # packed index of every slot
    padded = x[0][index]  # (N, T_max, ...)
    return padded.masked_fill(~mask.view(*mask.shape, *[1] * (x.ndim - 2)), 0), mask


def pack_sequences(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real rows of a padded batch's outputs, in packed order: `out [N, L, ...]` of the last `L` columns of the
    padded layout with padding `mask [N, T_max]` → `[1, R, ...]`, R the real slots among those columns (all of
    them, `ΣT`, when `L = T_max`)."""
    return out[mask[:, mask.shape[1] - out.shape[1]:]][None]


def grid_positions(grid_shape: Sequence[int], num_special: int = 0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The integer coordinates `[num_special + Π grid_shape, k]` (int64) of the tokens of a `k`-axis grid in raster
    (row-major, last axis fastest) order, after `num_special` leading special tokens at coordinate 0."""
    axes = [torch.arange(n, device=device) for n in grid_shape]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid_shape))
    return torch.cat((pos.new_zeros(num_special, len(grid_shape)), pos))


__all__ = ["cat_padding_masks", "check_cu_seqlens", "document_positions", "grid_positions", "pack_sequences",
           "real_counts", "real_positions", "unpack_sequences"]
