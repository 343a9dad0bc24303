"""Input checks shared by the ops and layers: rank, matching shapes, dtypes and masks.

They raise `ValueError` rather than `assert`, which `python -O` strips, and each message names the function,
the argument, what was expected and what was given. The checks read only shapes and dtypes (no values), so
they cost no device sync. Integer inputs are an error: they would otherwise be silently truncated or read as
zeros by float kernels.
"""

from __future__ import annotations

import torch


def check_float(op: str, **tensors: torch.Tensor | None) -> None:
    """Every given tensor (None skipped) is floating point."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}; convert it first "
                             f"(e.g. {name}.float())")


def check_heads(op: str, **tensors: torch.Tensor | None) -> tuple[int, int, int]:
    """Every given tensor is floating point, 4-D `[B, T, H, ·]`, and all share `[B, T, H]`; returns them."""
    check_float(op, **tensors)
    given = {n: t for n, t in tensors.items() if t is not None}
    for name, t in given.items():
        if t.ndim != 4:
            raise ValueError(f"{op}: {name} must be [B, T, H, D] (4-D), got shape {tuple(t.shape)}")
    shapes = {n: tuple(t.shape[:3]) for n, t in given.items()}
    first = next(iter(shapes.values()))
    if any(shape != first for shape in shapes.values()):  # no set(): symbolic sizes (torch.export) are unhashable
        listed = ", ".join(f"{n} {tuple(given[n].shape)}" for n in shapes)
        raise ValueError(f"{op}: inputs must share [B, T, H], got {listed}")
    return first


def check_mask(op: str, mask: torch.Tensor | None, B: int, T: int, name: str = "mask") -> None:
    """A padding mask is a bool `[B, T]` tensor (True = real token)."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"{op}: {name} must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{op}: {name} must be [B, T] = {[B, T]}, got shape {tuple(mask.shape)}")


def check_tokens(op: str, tokens: torch.Tensor) -> None:
    """Token ids are an integer `[B, T]` tensor."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{op}: tokens must be integer ids, got {tokens.dtype}; convert them with .long()")
    if tokens.ndim != 2:
        raise ValueError(f"{op}: tokens must be [B, T], got shape {tuple(tokens.shape)}")


def check_features(op: str, x: torch.Tensor, dim: int, name: str = "x") -> None:
    """A layer input is a floating-point `[B, T, dim]` tensor."""
    check_float(op, **{name: x})
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{op}: {name} must be [B, T, {dim}], got shape {tuple(x.shape)}")


def power_of_two(op: str, name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{op}: {name} must be a power of two, got {value!r}")
