"""Linear (kernelized) cross-attention: the context summarised once into a fixed-size state.

Katharopoulos et al., "Transformers are RNNs" (arXiv 2006.16236): with a positive feature map φ, attention
`o_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)` factorises as

    S = Σ_j φ(k_j) v_jᵀ   [H, D, Dv],     z = Σ_j φ(k_j)   [H, D]        (once per context)
    o_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z                                           (per query)

so a context of any length `S_len` costs O(S_len·D·Dv) once, and each query O(D·Dv), independent of the context
length: the state is what a sampler or a decoder reuses across steps. `linear_cross_attn_reference` is the
explicit form (the `[T, S_len]` matrix `φ(q) φ(k)ᵀ`, float64) that the tests compare against.

Layout `[B, T, H, D]` (as every op here); the state is float32. Padding keys (`key_padding_mask` False) get no
weight. The feature map defaults to `elu(x) + 1` (the paper's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .checks import check_float
from .linear_attn import elu_feature_map


class LinearContextState(NamedTuple):
    """The summary of a context for linear cross-attention.

    Attributes:
        kv (Tensor): `[B, H, D, Dv]` float32, `Σ_j φ(k_j) v_jᵀ` over the real context tokens.
        k_sum (Tensor): `[B, H, D]` float32, `Σ_j φ(k_j)`.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor


def linear_context_state(k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                         feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map
                         ) -> LinearContextState:
    """The state of a context with keys `k [B, S, H, D]` and values `v [B, S, H, Dv]`; `key_padding_mask [B, S]`
    bool, True = real token."""
    check_float("linear_context_state", k=k, v=v)
    phi = feature_map(k.float())  # (B, S, H, D)
    if key_padding_mask is not None:
        phi = phi * key_padding_mask[:, :, None, None].to(phi.dtype)
    return LinearContextState(torch.einsum("bshd,bshe->bhde", phi, v.float()), phi.sum(1))


def linear_cross_attn(q: torch.Tensor, state: LinearContextState,
                      feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map,
                      eps: float = 1e-6) -> torch.Tensor:
    """Queries `q [B, T, H, D]` against a context state → `o [B, T, H, Dv]` in the dtype of `q`. A context with no
    real token gives zeros (the normaliser is clamped at `eps`)."""
    check_float("linear_cross_attn", q=q)
    phi = feature_map(q.float())  # (B, T, H, D)
    num = torch.einsum("bthd,bhde->bthe", phi, state.kv)
    den = torch.einsum("bthd,bhd->bth", phi, state.k_sum)[..., None]
    return (num / den.clamp_min(eps)).to(q.dtype)


def linear_cross_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                key_padding_mask: torch.Tensor | None = None,
                                feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map
                                ) -> torch.Tensor:
    """The explicit form in float64: weights `A = φ(q) φ(k)ᵀ` `[B, H, T, S]`, padding columns zero, rows
    normalised, `o = A v`."""
    a = torch.einsum("bthd,bshd->bhts", feature_map(q.double()), feature_map(k.double()))
    if key_padding_mask is not None:
        a = a * key_padding_mask[:, None, None, :].double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhts,bshe->bthe", a, v.double()).to(q.dtype)


__all__ = ["LinearContextState", "linear_context_state", "linear_cross_attn",
           "linear_cross_attn_reference"]
