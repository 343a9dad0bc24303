"""Linear attention with a data-dependent multiplicative decay, and the multi-scan wrapper for grids.

This is the *multiplicative* baseline that LightNet (arXiv 2405.21022) compares against: per key channel `i`,

    S_t = diag(λ_t) S_{t-1} + (1 − λ_t) ⊙ k_t v_tᵀ,    o_t = scale · q_tᵀ S_t,    λ_t = exp(g_t) ∈ (0, 1]

(HGRN/GLA/Mamba family, written as in spec §1.2 so every step is a convex combination). The pair weight is a
product of gates along the path from s to t, so the operator depends on the scan order: a global receptive field
over a sequence needs one scan per direction (Vim: forward + backward, arXiv 2401.09417) and over a 2-D grid four
(VMamba's cross-scan, arXiv 2401.10166). `multi_scan_decay_attn` runs those directions and sums them.

Layouts: tensors `[B, T, H, D]` (sequence first); log-decays `g` `[B, T, H, K]` with `g ≤ 0`; the state
`S [B, H, K, V]` is float32 under any autocast.

The chunked form runs on `polyattn.ops.chunk_gated` (the kernel it shares with LightNet), with
`z = −(chunk-local cumulative log-decay)`.
"""

from collections.abc import Sequence

import torch

from .checks import check_heads, check_mask
from .chunk_gated import chunk_gated_core, chunk_len, from_chunks, matmul_dtype, to_chunks


def _check(op, q, k, v, g, mask):
    B, T, _ = check_heads(op, q=q, k=k, v=v, g=g)
    check_mask(op, mask, B, T)
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"{op}: q, k and g must have one shape [B, T, H, K], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, g {tuple(g.shape)}")


def _prepare(q, k, v, g, mask):
    """Casts the gating math to float32, zeros padded values and keys and sets padded log-decays to 0."""
    g = g.float()
    kh = -torch.expm1(g) * k.float()  # (1 − λ_t) k_t: the input share of the convex combination
    if mask is not None:
        m = mask[:, :, None, None]
        g = g.masked_fill(~m, 0.0)  # λ = 1 on padding: the state passes through unchanged
        kh = kh.masked_fill(~m, 0.0)
        v = v.masked_fill(~m, 0)
    return kh, g, v



def decay_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with a per-channel multiplicative decay, chunk-parallel form.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, H, K]`.
        v: values `[B, T, H, V]`.
        g: log-decays `[B, T, H, K]`, `g = log λ ≤ 0` (e.g. `logsigmoid(·)`).
        scale: query scale; None → `K^-0.5` (the FLA convention for this op).
        initial_state: `S_0 [B, H, K, V]` float32, or None for zeros.
        output_final_state: return `S_T`.
        mask: `[B, T]` bool, True = real token. Padded tokens leave the state unchanged (λ = 1, no input); their
            outputs are zero.
        chunk_size: tokens per chunk, a power of two (shorter inputs use the next power of two ≥ T); it changes
            only round-off.

    Returns:
        `o [B, T, H, V]` in the dtype of `v`, and `S_T [B, H, K, V]` float32 (or None).
    """
    _check("decay_attn", q, k, v, g, mask)
    T, K = q.shape[1], q.shape[3]
    scale = K**-0.5 if scale is None else scale
    kh, g, v = _prepare(q, k, v, g, mask)
    C = chunk_len("decay_attn", chunk_size, T)
    qc = to_chunks(q, C).unsqueeze(-2)  # the core casts chunk groups as it goes
    kc = to_chunks(kh, C).unsqueeze(-2)
    vc = to_chunks(v, C)
    # chunk-local cumulative decay keeps the exponents small numbers (a global cumsum loses precision)
    zc = -to_chunks(g, C).cumsum(dim=3)
    z_prev = zc.new_zeros(zc.shape[:3] + zc.shape[4:])
    o, state = chunk_gated_core(qc, kc, vc, zc, z_prev, initial_state, matmul_dtype(q, v))
    o = from_chunks(o, T) * scale
    if mask is not None:
        o = o.masked_fill(~mask[:, :, None, None], 0.0)
    return o.to(v.dtype), (state if output_final_state else None)


def decay_attn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token form of `decay_attn` (decoding; same arguments and returns), float32 state."""
    _check("decay_attn_recurrent", q, k, v, g, mask)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    kh, g, v = _prepare(q, k, v, g, mask)
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state
    state = state.float()
    outs = []
    for t in range(T):
        state = torch.exp(g[:, t]).unsqueeze(-1) * state + kh[:, t].unsqueeze(-1) * v[:, t].float().unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), state))
    o = torch.stack(outs, dim=1) * scale if outs else v.new_zeros(B, 0, H, v.shape[-1], dtype=torch.float32)
    if mask is not None:
        o = o.masked_fill(~mask[:, :, None, None], 0.0)
    return o.to(v.dtype), (state if output_final_state else None)


def decay_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct sums in float64: `o_t = scale Σ_i q_ti [Σ_{s≤t} (1−λ_si) Π_{j=s+1..t} λ_ji k_si v_s + Π_{j≤t} λ_ji S0_i]`.

    Returns `(o [B, T, H, V] float64, S_T [B, H, K, V] float64)`.
    """
    _check("decay_attn_reference", q, k, v, g, mask)
    B, T, H, K = q.shape
    if T == 0:
        state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state
        return v.new_zeros(B, 0, H, v.shape[-1], dtype=torch.float64), state.double()
    scale = K**-0.5 if scale is None else scale
    q, k, v, g = (x.double() for x in (q, k, v, g))
    if mask is not None:
        m = mask[:, :, None, None]
        g, k, v = g.masked_fill(~m, 0.0), k.masked_fill(~m, 0.0), v.masked_fill(~m, 0.0)
    G = g.cumsum(1)  # [B, T, H, K]
    tri = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    # w[b, t, s, h, i] = (1 − λ_s) exp(G_t − G_s) for s ≤ t
    w = torch.exp(torch.where(tri[None, :, :, None, None], G[:, :, None] - G[:, None], -torch.inf))
    w = w * (-torch.expm1(g))[:, None]
    o = torch.einsum("bthi,btshi,bshi,bshv->bthv", q, w, k, v)
    state = torch.einsum("bshi,bshi,bshv->bhiv", w[:, -1], k, v)
    if initial_state is not None:
        s0 = initial_state.double()
        o = o + torch.einsum("bthi,bthi,bhiv->bthv", q, torch.exp(G), s0)
        state = state + torch.exp(G[:, -1]).unsqueeze(-1) * s0
    o = o * scale
    if mask is not None:
        o = o.masked_fill(~mask[:, :, None, None], 0.0)
    return o, state


# --- multi-scan over grids -------------------------------------------------------------------------------------

def scan_orders(grid_shape: Sequence[int], directions: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """Token orders (index permutations of the row-major flattening) for 1, 2 or 4 scan directions.

    1: row-major; 2: row-major forward and backward (Vim); 4: row-major and column-major, each forward and
    backward (VMamba's cross-scan; 2-D grids only).
    """
    T = 1
    for n in grid_shape:
        T *= n
    row = torch.arange(T, device=device)
    if directions == 1:
        return [row]
    if directions == 2:
        return [row, row.flip(0)]
    if directions == 4:
        if len(grid_shape) != 2:
            raise ValueError(f"the 4-direction cross-scan is defined for 2-D grids, got grid {tuple(grid_shape)}")
        col = row.reshape(grid_shape).t().reshape(-1)
        return [row, row.flip(0), col, col.flip(0)]
    raise ValueError(f"directions must be 1, 2 or 4, got {directions}")


def multi_scan_decay_attn(
    q: torch.Tensor | Sequence[torch.Tensor],
    k: torch.Tensor | Sequence[torch.Tensor],
    v: torch.Tensor | Sequence[torch.Tensor],
    g: torch.Tensor | Sequence[torch.Tensor],
    *,
    grid_shape: Sequence[int],
    directions: int,
    divide: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sum of causal multiplicative scans over several orders of a grid (Vim / VMamba style), `[B, T, H, V]`.

    Each of q, k, v, g is either one `[B, T, H, ·]` tensor (row-major grid tokens, shared by all directions)
    or a sequence of `directions` such tensors (per-direction parameters). All directions run as one batched
    call (the directions are stacked along the batch axis), then each output is put back in row-major order and
    summed; `divide=True` averages instead (Vim's released "div2" models, which avoids doubling activations).
    `mask [B, T]` (True = real token) is permuted with the tokens: padded tokens are skipped by every scan.
    """
    orders = scan_orders(grid_shape, directions, device=v.device if torch.is_tensor(v) else v[0].device)

    def stack(x):
        xs = [x] * directions if torch.is_tensor(x) else list(x)
        if len(xs) != directions:
            raise ValueError(f"multi_scan_decay_attn: expected {directions} per-direction tensors, got {len(xs)}")
        return torch.cat([xi[:, order] for xi, order in zip(xs, orders)], dim=0)

    B = (v if torch.is_tensor(v) else v[0]).shape[0]
    mask_all = None if mask is None else torch.cat([mask[:, order] for order in orders], dim=0)
    o, _ = decay_attn(stack(q), stack(k), stack(v), stack(g), scale=scale, mask=mask_all, chunk_size=chunk_size)
    out = 0
    for d, order in enumerate(orders):
        out = out + o[d * B:(d + 1) * B].index_select(1, torch.argsort(order))
    return out / directions if divide else out

