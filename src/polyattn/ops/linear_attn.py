"""Kernelized (feature-map) linear attention: `o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)`.

Katharopoulos et al., "Transformers are RNNs", arXiv 2006.16236: with a non-negative feature map φ the softmax
kernel `exp(q·k)` is replaced by `φ(q)·φ(k)`, so attention becomes a running sum `S_t = Σ_{s≤t} φ(k_s) v_sᵀ`,
`z_t = Σ_{s≤t} φ(k_s)` (causal), or one global sum (non-causal). Layout and state contract as
`polyattn.ops.lightnet.lightnet_attn`: `[B, T, H, D]` inputs, a float32 state `(S [B, H, F, Dv], z [B, H, F])`
that a later call continues, padding masks `[B, T]` (True = real token).

Feature maps (`FeatureMap`, applied to q and k per head, `[..., D] → [..., F]`):

- `ELU`: `elu(x) + 1` (arXiv 2006.16236), F = D.
- `RELU`: `relu(x)`, F = D.
- `FAVOR`: Performer's positive random features (arXiv 2009.14794), `exp(Wx − |x|²/2) / √m` with orthogonal
  Gaussian rows `W [m, D]`, passed as `projection`; the layer redraws them on request (`redraw_features`).
- `COSFORMER`: cosFormer's re-weighting (arXiv 2202.08791): `relu(x)` times `cos(π i / 2M)` and `sin(π i / 2M)`
  of the token's position `i` (F = 2D), so that `φ(q_i)·φ(k_j) = relu(q)·relu(k) cos(π (i − j) / 2M)`; `M` is a
  fixed horizon (`max_len`) so that decoding continues exactly.
- `HEDGEHOG`: a learnable map (arXiv 2402.04347), `[softmax(xW), softmax(−xW)]` over the features (F = 2m),
  with `W [H, D, m]` passed as `projection`.

Forms: `linear_attn` (chunked causal: within a chunk an explicit masked product, across chunks the state;
global: two matmuls), `linear_attn_recurrent` (token by token, the decoding step), and
`linear_attn_reference` (float64, an explicit `[T, T]` kernel matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import check_heads, check_mask
from .chunk_gated import chunk_len, from_chunks, to_chunks


class FeatureMap(str, Enum):
    """The feature map φ of kernelized linear attention (module docstring)."""

    ELU = "elu"
    RELU = "relu"
    FAVOR = "favor"
    COSFORMER = "cosformer"
    HEDGEHOG = "hedgehog"


class LinearAttnState(NamedTuple):
    """Running sums of a causal linear attention: `S [B, H, F, Dv]`, `z [B, H, F]`, float32."""

    S: torch.Tensor
    z: torch.Tensor


def orthogonal_gaussian(num_features: int, dim: int, *, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    """Performer's projection `[m, D]`: blocks of orthogonal rows, each row rescaled to a chi(D) norm."""
    blocks, left = [], num_features
    while left > 0:
        g = torch.randn(dim, dim, generator=generator, device=device)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))  # the signs that make Q uniform (Haar); bare QR is biased
        blocks.append(q.T[:min(left, dim)])
        left -= dim
    w = torch.cat(blocks)
    norms = torch.randn(num_features, dim, generator=generator, device=device).norm(dim=-1)
    return w * norms[:, None]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """`φ(x) = elu(x) + 1` (arXiv 2006.16236 §3.2): positive, so every normaliser is > 0."""
    return F.elu(x) + 1


def feature_map_fn(kind: FeatureMap, *, projection: torch.Tensor | None = None, max_len: int = 4096
                   ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """φ as a function `(x [B, T, H, D], positions [B|1, T] | None) → [B, T, H, F]` in float32."""
    if kind in (FeatureMap.FAVOR, FeatureMap.HEDGEHOG) and projection is None:
        raise ValueError(f"the {kind.value} feature map needs its projection")

    def phi(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        x = x.float()
        if kind is FeatureMap.ELU:
            return elu_feature_map(x)
        if kind is FeatureMap.RELU:
            return F.relu(x)
        if kind is FeatureMap.FAVOR:
            m = projection.shape[0]
            wx = torch.einsum("bthd,md->bthm", x, projection.float())
            return torch.exp(wx - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(m)
        if kind is FeatureMap.HEDGEHOG:
            wx = torch.einsum("bthd,hdm->bthm", x, projection.float())
            return torch.cat([wx.softmax(-1), (-wx).softmax(-1)], dim=-1)
        # COSFORMER
        if positions is None:
            raise ValueError("the cosformer feature map needs token positions")
        angle = (math.pi / 2 / max_len) * positions.float()[..., None, None]  # (B|1, T, 1, 1)
        r = F.relu(x)
        return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)

    return phi


def _masked(phi_k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    if mask is None:
        return phi_k, v.float()
    m = mask[:, :, None, None]
    return phi_k.masked_fill(~m, 0), v.float().masked_fill(~m, 0)


def _initial(B, H, Fd, Dv, state: LinearAttnState | None, like: torch.Tensor) -> LinearAttnState:
    if state is not None:
        return LinearAttnState(state.S.float(), state.z.float())
    return LinearAttnState(like.new_zeros(B, H, Fd, Dv, dtype=torch.float32),
                           like.new_zeros(B, H, Fd, dtype=torch.float32))


def _entering(start: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """The running sum entering each chunk: `start [B, H, ...]` plus what the chunks before it added
    (`added [B, H, N, ...]`), summed in the recurrence's order. (Not `cumsum − added`: its round-off reaches
    outputs whose normaliser is near zero, as ReLU features give.)"""
    return torch.cat([start.unsqueeze(2), added[:, :, :-1]], dim=2).cumsum(2)


def linear_attn(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                initial_state: LinearAttnState | None = None, output_final_state: bool = False,
                mask: torch.Tensor | None = None, chunk_size: int = 64, eps: float = 1e-6
                ) -> tuple[torch.Tensor, LinearAttnState | None]:
    """Linear attention of feature-mapped queries and keys (`feature_map_fn`).

    Args:
        phi_q, phi_k: `[B, T, H, F]` non-negative features of the queries and keys.
        v: `[B, T, H, Dv]`.
        causal: running sums over the prefix (chunked), or one global sum.
        initial_state: the state of a previous causal call; the new tokens continue it.
        output_final_state: return the state after the last token (causal only).
        mask: `[B, T]` bool, True = real; padded keys add nothing, padded outputs are 0.
        chunk_size: chunk length of the causal form, a power of two (changes only round-off).
        eps: added to the normaliser `φ(q)ᵀ z`.

    Returns:
        `(o [B, T, H, Dv] in v's dtype, state or None)`.
    """
    check_heads("linear_attn", phi_q=phi_q, phi_k=phi_k, v=v)
    check_mask("linear_attn", mask, *phi_q.shape[:2])
    B, T, H, Fd = phi_q.shape
    Dv = v.shape[-1]
    q = phi_q.float()
    k, vf = _masked(phi_k.float(), v, mask)
    if not causal:
        if initial_state is not None or output_final_state:
            raise ValueError("the global (non-causal) form has no decoding state; use causal=True to decode")
        S = torch.einsum("bthf,bthv->bhfv", k, vf)
        z = k.sum(1)  # (B, H, F)
        num = torch.einsum("bthf,bhfv->bthv", q, S)
        den = torch.einsum("bthf,bhf->bth", q, z)[..., None] + eps
        o = num / den
        o = o if mask is None else o.masked_fill(~mask[:, :, None, None], 0)
        return o.to(v.dtype), None
    S0, z0 = _initial(B, H, Fd, Dv, initial_state, q)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), (LinearAttnState(S0, z0) if output_final_state else None)
    # Every chunk at once: a loop over chunks costs a few small kernels per chunk, so one long window ran up to
    # 4x slower than many short windows of the same tokens (lm_long's elu+1 rows).
    C = chunk_len("linear_attn", chunk_size, T)
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(vf, C)  # [B, H, N, C, F|Dv], zero-padded
    kv = torch.einsum("bhncf,bhncv->bhnfv", kc, vc)  # what each chunk adds to the state
    ksum = kc.sum(3)  # [B, H, N, F]
    S_in, z_in = _entering(S0, kv), _entering(z0, ksum)
    tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    a = torch.einsum("bhntf,bhnsf->bhnts", qc, kc).masked_fill(~tri, 0)  # [B, H, N, C, C]
    num = a @ vc + torch.einsum("bhntf,bhnfv->bhntv", qc, S_in)
    den = a.sum(-1) + torch.einsum("bhntf,bhnf->bhnt", qc, z_in)
    o = from_chunks(num / (den[..., None] + eps), T)
    S, z = S_in[:, :, -1] + kv[:, :, -1], z_in[:, :, -1] + ksum[:, :, -1]
    o = o if mask is None else o.masked_fill(~mask[:, :, None, None], 0)
    return o.to(v.dtype), (LinearAttnState(S, z) if output_final_state else None)


def linear_attn_recurrent(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *,
                          initial_state: LinearAttnState | None = None, mask: torch.Tensor | None = None,
                          eps: float = 1e-6) -> tuple[torch.Tensor, LinearAttnState]:
    """The causal form one token at a time (the decoding step): `S += φ(k) vᵀ`, `z += φ(k)`, then the output."""
    check_heads("linear_attn_recurrent", phi_q=phi_q, phi_k=phi_k, v=v)
    check_mask("linear_attn_recurrent", mask, *phi_q.shape[:2])
    B, T, H, Fd = phi_q.shape
    q = phi_q.float()
    k, vf = _masked(phi_k.float(), v, mask)
    S, z = _initial(B, H, Fd, v.shape[-1], initial_state, q)
    outs = []
    for t in range(T):
        S = S + k[:, t, :, :, None] * vf[:, t, :, None, :]
        z = z + k[:, t]
        num = torch.einsum("bhf,bhfv->bhv", q[:, t], S)
        den = torch.einsum("bhf,bhf->bh", q[:, t], z)[..., None] + eps
        outs.append(num / den)
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    o = o if mask is None else o.masked_fill(~mask[:, :, None, None], 0)
    return o.to(v.dtype), LinearAttnState(S, z)


def linear_attn_reference(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                          mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """float64 reference: the explicit kernel matrix `A[t, s] = φ(q_t)·φ(k_s)` (masked), `o = A v / (A 1 + eps)`."""
    q, k, vd = phi_q.double(), phi_k.double(), v.double()
    a = torch.einsum("bthf,bshf->bhts", q, k)
    T = q.shape[1]
    if causal:
        a = a.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0)
    if mask is not None:
        a = a.masked_fill(~mask[:, None, None, :], 0)
    o = torch.einsum("bhts,bshv->bthv", a, vd) / (a.sum(-1).transpose(1, 2)[..., None] + eps)
    return o if mask is None else o.masked_fill(~mask[:, :, None, None], 0)
