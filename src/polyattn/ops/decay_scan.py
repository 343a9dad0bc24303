"""Linear attention with a data-dependent multiplicative decay, and the multi-scan wrapper for grids.

This is the *multiplicative* baseline that LightNet (arXiv 2405.21022) compares against: per key channel `i`,

    S_t = diag(λ_t) S_{t-1} + (1 − λ_t) ⊙ k_t v_tᵀ,    o_t = scale · q_tᵀ S_t,    λ_t = exp(g_t) ∈ (0, 1]

(HGRN/GLA/Mamba family, written as in spec §1.2 so every step is a convex combination). The pair weight is a
product of gates along the path from s to t, so the operator depends on the scan order: a global receptive field
over a sequence needs one scan per direction (Vim: forward + backward, arXiv 2401.09417) and over a 2-D grid four
(VMamba's cross-scan, arXiv 2401.10166). `multi_scan_decay_attn` runs those directions and sums them.

Layouts: tensors `[B, T, H, D]` (sequence first); log-decays `g` `[B, T, H, K]` with `g ≤ 0`; the state
`S [B, H, K, V]` is float32 under any autocast.

The module also holds `chunk_gated_core`, the chunk-parallel engine shared with `polyattn.ops.lightnet`.
"""

from collections.abc import Sequence

import torch

# A finite stand-in for −inf in log-space bookkeeping: exp(NEG − x) is exactly 0 for any sane x, while
# NEG − NEG = 0 keeps padded positions free of the NaN that (−inf) − (−inf) would produce, forward and backward.
NEG = -1e30


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Matrix product in the compute dtype (bfloat16 inputs stay bfloat16: ~3× faster with AMX), float32 out."""
    return torch.matmul(a.to(dtype), b.to(dtype)).float()


def chunk_gated_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: torch.Tensor,
    z_prev: torch.Tensor,
    initial_state: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel gated linear attention in log-normaliser coordinates (no overflow for any input).

    The contribution of key `s` to query `t ≥ s` (same sequence) is `q_t · (k_s ⊙ exp(z_s − z_t)) v_s`, where
    `z` is non-decreasing along time within a chunk (LightNet: the running log-normaliser; multiplicative decay:
    minus the chunk-local cumulative log-decay). The state entering chunk `j` is stored normalised to
    `z_prev[j] ≤ z` of that chunk. Every exponent evaluated here is ≤ 0:

    - chunk level: state decay `exp(z_prev − z_end)` and inter-chunk query factors `exp(z_prev − z_t)`;
    - inside a chunk, by halving: at each level a block of L tokens is split in two, and the first half's keys
      act on the second half's queries through the GLA split `exp(z_s − z_t) = exp(z_s − z_m)·exp(z_m − z_t)`
      with `z_m` at the end of the first half, i.e. *between* s and t, so both factors are ≤ 1 (when one
      underflows, the true weight is below float32 range too). After log2(C) levels only s = t is left.

    This makes the intra-chunk work a few matmuls per level and O(K) exponentials per token per level, instead
    of the C×C×K exponent tensor of the direct form.

    Shapes (chunked, head-first for batched matmuls): `q, k [B, H, N, C, R, K]` (R copies of the key channels,
    e.g. R = 2 for cosine LRPE, all sharing the decay of their channel; C a power of two),
    `v [B, H, N, C, V]`, `z [B, H, N, C, K]`, `z_prev [B, H, N, K]`, `initial_state [B, H, R·K, V]` float32
    (normalised to `z_prev[:, :, 0]`).

    Returns:
        `o [B, H, N, C, V]` float32 (unscaled) and the final state `[B, H, R·K, V]` float32, normalised to
        `z[:, :, -1, -1]`.
    """
    B, H, N, C, R, K = q.shape
    V = v.shape[-1]
    assert C & (C - 1) == 0, f"chunk size {C} must be a power of two"
    cdt = compute_dtype

    # --- s = t
    o = (q * k).sum((-2, -1)).unsqueeze(-1) * v.float()  # [B, H, N, C, V]

    # --- halving levels: first half → second half of every block of L tokens
    L = 2
    while L <= C:
        h = L // 2
        nb = C // L
        qb = q.reshape(B, H, N, nb, 2, h, R, K)
        kb = k.reshape(B, H, N, nb, 2, h, R, K)
        zb = z.reshape(B, H, N, nb, 2, h, K)
        vb = v.reshape(B, H, N, nb, 2, h, V)
        z_mid = zb[:, :, :, :, 0, -1:]  # [B, H, N, nb, 1, K]: end of the first half
        k_first = kb[:, :, :, :, 0] * torch.exp(zb[:, :, :, :, 0] - z_mid).unsqueeze(-2)  # ≤ |k|
        q_second = qb[:, :, :, :, 1] * torch.exp(z_mid - zb[:, :, :, :, 1]).unsqueeze(-2)  # ≤ |q|
        scores = _mm(q_second.flatten(-2), k_first.flatten(-2).transpose(-1, -2), cdt)  # [.., nb, h_t, h_s]
        # in place into the second halves: avoids a zero-padded full-size temporary per level
        o.view(B, H, N, nb, 2, h, V)[:, :, :, :, 1] += _mm(scores, vb[:, :, :, :, 0], cdt)
        L *= 2

    # --- chunk level: local chunk sums, the (sequential, cheap) state recurrence, inter-chunk outputs
    z_end = z[..., -1, :]  # [B, H, N, K]
    k_end = (k * torch.exp(z - z_end.unsqueeze(-2)).unsqueeze(-2)).reshape(B, H, N, C, R * K)
    local = _mm(k_end.transpose(-1, -2), v, cdt)  # [B, H, N, R·K, V]
    a = torch.exp(z_prev - z_end).repeat(1, 1, 1, R).unsqueeze(-1)  # [B, H, N, R·K, 1]
    state = q.new_zeros(B, H, R * K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    entering = []
    # N = T / C steps of O(K·V) work: cheap next to the matmuls above. unbind (not a[:, :, j]) so that backward
    # assembles the slice gradients once instead of materialising a full-size zero tensor per step.
    for a_j, local_j in zip(a.unbind(2), local.unbind(2)):
        entering.append(state)
        state = a_j * state + local_j
    s_in = torch.stack(entering, dim=2)  # [B, H, N, R·K, V]
    q_in = (q * torch.exp(z_prev.unsqueeze(-2) - z).unsqueeze(-2)).reshape(B, H, N, C, R * K)
    o = o + _mm(q_in, s_in, cdt)
    return o, state


def _pad_time(x: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    """Pads dim 1 (time) of a `[B, T, ...]` tensor at the end."""
    if pad == 0:
        return x
    return torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), value)], dim=1)


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`[B, T, H, ...]` → `[B, H, N, C, ...]` (T a multiple of `chunk`)."""
    B, T, H = x.shape[:3]
    return x.reshape(B, T // chunk, chunk, H, *x.shape[3:]).movedim(3, 1)


def _from_chunks(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, C, ...]` → `[B, T, H, ...]`."""
    B, H, N, C = x.shape[:4]
    return x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])


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
    T, K = q.shape[1], q.shape[3]
    scale = K**-0.5 if scale is None else scale
    kh, g, v = _prepare(q, k, v, g, mask)
    C = _chunk_len(chunk_size, T)
    pad = -T % C
    qc = _to_chunks(_pad_time(q.float(), pad), C).unsqueeze(-2)
    kc = _to_chunks(_pad_time(kh, pad), C).unsqueeze(-2)
    vc = _to_chunks(_pad_time(v, pad), C)
    # chunk-local cumulative decay keeps the exponents small numbers (a global cumsum loses precision)
    zc = -_to_chunks(_pad_time(g, pad), C).cumsum(dim=3)
    z_prev = zc.new_zeros(zc.shape[:3] + zc.shape[4:])
    o, state = chunk_gated_core(qc, kc, vc, zc, z_prev, initial_state, _compute_dtype(q, v))
    o = _from_chunks(o)[:, :T] * scale
    if mask is not None:
        o = o.masked_fill(~mask[:, :, None, None], 0.0)
    return o.to(v.dtype), (state if output_final_state else None)


def _chunk_len(chunk_size: int, T: int) -> int:
    """The chunk length used for T tokens: `chunk_size` (a power of two), or the next power of two ≥ T if smaller."""
    assert chunk_size > 0 and chunk_size & (chunk_size - 1) == 0, f"chunk_size {chunk_size} is not a power of two"
    return min(chunk_size, 1 << max(T - 1, 0).bit_length())


def _compute_dtype(q: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """Matmul dtype: bfloat16/float16 if the inputs are, or if a CPU/CUDA autocast region asks for it."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(q.dtype, v.dtype) if q.dtype != torch.float64 else torch.float64


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
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    kh, g, v = _prepare(q, k, v, g, mask)
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state
    state = state.float()
    outs = []
    for t in range(T):
        state = torch.exp(g[:, t]).unsqueeze(-1) * state + kh[:, t].unsqueeze(-1) * v[:, t].float().unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), state))
    o = torch.stack(outs, dim=1) * scale
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
    T, K = q.shape[1], q.shape[3]
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
        assert len(grid_shape) == 2, "the 4-direction cross-scan is defined for 2-D grids"
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
        assert len(xs) == directions, f"expected {directions} per-direction tensors, got {len(xs)}"
        return torch.cat([xi[:, order] for xi, order in zip(xs, orders)], dim=0)

    B = (v if torch.is_tensor(v) else v[0]).shape[0]
    mask_all = None if mask is None else torch.cat([mask[:, order] for order in orders], dim=0)
    o, _ = decay_attn(stack(q), stack(k), stack(v), stack(g), scale=scale, mask=mask_all, chunk_size=chunk_size)
    out = 0
    for d, order in enumerate(orders):
        out = out + o[d * B:(d + 1) * B].index_select(1, torch.argsort(order))
    return out / directions if divide else out

