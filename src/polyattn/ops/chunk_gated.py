"""Chunk-parallel gated linear attention: the kernel under LightNet's causal form and the multiplicative decay scan.

Both ops are, per key channel, gated linear attention written in *log-normaliser coordinates*: the contribution of
key `s` to query `t ≥ s` is `q_t · (k_s ⊙ exp(z_s − z_t)) v_s` with `z` non-decreasing along time, so no exponent
evaluated here is ever positive (LightNet, `polyattn.ops.lightnet`: `z` is the running log-normaliser of the keys;
the decay scan, `polyattn.ops.decay_scan`: minus the chunk-local cumulative log-decay). This module is what they
share, as flash-linear-attention's LightNet sits on its GLA kernel (`polyattn.ops.gla_backends` is the seam for
such external kernels):

- `chunk_gated_core` — the kernel, hand-written backward (`ChunkGatedCore`); `chunk_gated_core_autograd` — the
  same math, readable and differentiated by autograd (the reference the tests compare it with).
- the token layout around it: `chunk_len`, `pad_time`, `to_chunks`, `from_chunks` (`[B, T, H, ...]` ↔
  `[B, H, N, C, ...]`), and `NEG`, the finite stand-in for −inf in log-space bookkeeping.
- the per-device dtype choices of the linear-attention ops: `matmul_dtype` (the ops' product dtype) and
  `core_dtype` (the kernel's own, narrower rule), each with the measurement that decided it.
"""

import torch

from ..hardware import native_bf16
from .checks import power_of_two

# A finite stand-in for −inf in log-space bookkeeping: exp(NEG − x) is exactly 0 for any sane x, while
# NEG − NEG = 0 keeps padded positions free of the NaN that (−inf) − (−inf) would produce, forward and backward.
NEG = -1e30


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a compute dtype: float64 stays float64 (gradcheck), anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_dtype(q: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """Matmul dtype: bfloat16/float16 if the inputs are, or if a CPU/CUDA autocast region asks for it; float32 on a
    CPU without native bfloat16 products, where a bfloat16 product is ~100x slower than the casts around a float32
    one (polyattn.hardware)."""
    kind = q.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
    else:
        dtype = torch.promote_types(q.dtype, v.dtype) if q.dtype != torch.float64 else torch.float64
    if dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu" and not native_bf16(q.device):
        return torch.float32
    return dtype


def core_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The chunk core's product dtype: float32 on every CPU for low-precision inputs. Its products are small
    (chunk × head dim), so casting their operands costs more than native bfloat16 saves. Measured, 2 threads,
    causal LightNet fwd+bwd with bfloat16 inputs, AVX-512 BF16: 16K tokens × 4 heads of 64, 287 ms in float32
    against 322–362 ms in bfloat16; 8 × 1024 tokens × 4 heads of 32, 72–76 ms against 89–108 ms. Without native
    bfloat16 (AVX2) the bfloat16 products are ~100x slower still (`polyattn bench dtypes` takes it both ways)."""
    if device.type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return compute_dtype


def chunk_len(op: str, chunk_size: int, T: int) -> int:
    """The chunk length `op` uses for T tokens: `chunk_size` (a power of two), or the next power of two ≥ T if
    smaller."""
    power_of_two(op, "chunk_size", chunk_size)
    return min(chunk_size, 1 << max(T - 1, 0).bit_length())


def pad_time(x: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    """Pads dim 1 (time) of a `[B, T, ...]` tensor at the end."""
    if pad == 0:
        return x
    return torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), value)], dim=1)


def to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`[B, T, H, ...]` → `[B, H, N, C, ...]`, T padded with zeros at the end to a multiple of `chunk`."""
    x = pad_time(x, -x.shape[1] % chunk)
    B, T, H = x.shape[:3]
    return x.reshape(B, T // chunk, chunk, H, *x.shape[3:]).movedim(3, 1)


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """`[B, H, N, C, ...]` → `[B, T, H, ...]`: the first T tokens (the rest is the padding of `to_chunks`)."""
    B, H, N, C = x.shape[:4]
    return x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])[:, :T]


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Matrix product in the compute dtype (bfloat16 inputs stay bfloat16: ~3× faster with AMX), float32 out
    (float64 when the compute dtype is float64)."""
    return torch.matmul(a.to(dtype), b.to(dtype)).to(_acc(dtype))


def _mm_small(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`a @ b` as `_mm`, but as a broadcast product when the result or the inner dimension is tiny (≤ 2 rows and
    columns, or an inner dimension ≤ 2): batched GEMM calls on 1×1 or 2×2 blocks cost far more than their work."""
    if (a.shape[-2] <= 2 and b.shape[-1] <= 2) or a.shape[-1] <= 2:
        acc = _acc(dtype)
        return (a.to(acc).unsqueeze(-1) * b.to(acc).unsqueeze(-3)).sum(-2)
    return _mm(a, b, dtype)


def _sum_r(x: torch.Tensor) -> torch.Tensor:
    """Sums the R copies of each key channel (`[..., R, K]` → `[..., K]`); a view when R = 1."""
    return x.squeeze(-2) if x.shape[-2] == 1 else x.sum(-2)


def chunk_gated_core_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: torch.Tensor,
    z_prev: torch.Tensor,
    initial_state: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel gated linear attention in log-normaliser coordinates (no overflow for any input).

    The readable form, differentiated by autograd; `chunk_gated_core` computes the same with a hand-written
    backward (less memory, fewer passes) and is what the ops use. Tests compare the two.

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
    power_of_two("chunk_gated_core", "the chunk length", C)
    cdt = compute_dtype

    # --- s = t
    o = (q * k).sum((-2, -1)).unsqueeze(-1) * v.to(_acc(cdt))  # [B, H, N, C, V]

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
    state = q.new_zeros(B, H, R * K, V, dtype=_acc(cdt)) if initial_state is None else initial_state.to(_acc(cdt))
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


LOG2E = 1.4426950408889634  # the fast core keeps z in log2 units: every decay factor is one exp2 (~2× cheaper)


def _level_factors(q, k, z2, L):
    """Halving level L of the chunk core: second-half queries and first-half keys rescaled to the block middle.

    `q, k [B, H, N, C, R, K]`, `z2 [B, H, N, C, K]` (log2 units) → `q' = q ⊙ 2^(z_m − z_t)` `[B, H, N, C/L, L/2, R, K]`
    (second halves), `k' = k ⊙ 2^(z_s − z_m)` (first halves), and the factors `[B, H, N, C/L, L/2, 1, K]`. `z_m`, the
    end of the first half, lies between every key s and query t of the pair, so both factors are ≤ 1.
    """
    B, H, N, C, R, K = q.shape
    h = L // 2
    zb = z2.view(B, H, N, C // L, 2, h, K)
    z_mid = zb[:, :, :, :, 0, -1:]
    e_first = (zb[:, :, :, :, 0] - z_mid).exp2_().unsqueeze(-2)
    e_second = (z_mid - zb[:, :, :, :, 1]).exp2_().unsqueeze(-2)
    q_second = q.view(B, H, N, C // L, 2, h, R, K)[:, :, :, :, 1] * e_second
    k_first = k.view(B, H, N, C // L, 2, h, R, K)[:, :, :, :, 0] * e_first
    return q_second, k_first, e_second, e_first


def _core_forward(q, k, v, z2, zp2, s0, cdt):
    """Forward of `ChunkGatedCore` on a group of chunks: contiguous `q, k [B, H, G, C, R, K]`, `v [B, H, G, C, V]`,
    `z2 [B, H, G, C, K]`, `zp2 [B, H, G, K]` (log2 units, accumulation dtype), `s0 [B, H, R·K, V]`.

    Returns `o [B, H, G, C, V]`, the state after the group, and what backward needs: the states entering every
    chunk `[B, H, G, R·K, V]` and the score matrices of the halving levels.
    """
    B, H, N, C, R, K = q.shape
    V = v.shape[-1]
    acc = q.dtype
    v_c = v.to(cdt)  # matmul operand, cast once

    o = (q * k).sum((-2, -1)).unsqueeze(-1) * v  # s = t
    scores = []
    L = 2
    while L <= C:
        h = L // 2
        qs, kf, _, _ = _level_factors(q, k, z2, L)
        A = _mm_small(qs.flatten(-2), kf.flatten(-2).transpose(-1, -2), cdt).to(acc)  # [.., C/L, h_t, h_s]
        v_f = v_c.view(B, H, N, C // L, 2, h, V)[:, :, :, :, 0]
        o.view(B, H, N, C // L, 2, h, V)[:, :, :, :, 1] += _mm_small(A, v_f, cdt)
        scores.append(A)
        L *= 2

    z_end = z2[..., -1, :]  # [B, H, N, K]
    k_end = (k * torch.exp2(z2 - z_end.unsqueeze(-2)).unsqueeze(-2)).view(B, H, N, C, R * K)
    local = _mm(k_end.transpose(-1, -2), v_c, cdt).to(acc)  # [B, H, N, R·K, V]
    a = torch.exp2(zp2 - z_end).repeat(1, 1, 1, R).unsqueeze(-1)  # [B, H, N, R·K, 1]
    s_in = q.new_empty(B, H, N, R * K, V)  # the state entering every chunk
    state = s0
    for n in range(N):
        s_in[:, :, n] = state
        state = torch.addcmul(local[:, :, n], a[:, :, n], state)
    q_in = (q * torch.exp2(zp2.unsqueeze(-2) - z2).unsqueeze(-2)).view(B, H, N, C, R * K)
    o += _mm(q_in, s_in, cdt)
    return o, state, s_in, scores


def _core_backward(q, k, v, z2, zp2, s_in, scores, do, d_state, cdt):
    """Backward of `_core_forward` for one group, given `do` and the gradient of the state after the group.

    Returns `dq, dk, dv, dz, dz_prev` (z in natural-log units) and the gradient of the state entering the group.
    """
    B, H, N, C, R, K = q.shape
    V = v.shape[-1]
    acc = q.dtype
    v_c, do_c = v.to(cdt), do.to(cdt)

    # s = t
    dov = (do * v).sum(-1)[..., None, None]  # [B, H, N, C, 1, 1]
    dq = dov * k
    dk = dov * q
    dv = (q * k).sum((-2, -1)).unsqueeze(-1) * do

    # chunk level: inter-chunk outputs
    e_q = torch.exp2(zp2.unsqueeze(-2) - z2).unsqueeze(-2)  # [B, H, N, C, 1, K]
    q_in = (q * e_q).view(B, H, N, C, R * K)
    dq_in = _mm(do_c, s_in.transpose(-1, -2), cdt).to(acc).view(B, H, N, C, R, K)
    dq.addcmul_(dq_in, e_q)
    dz = -_sum_r(dq_in.mul_(q_in.view(B, H, N, C, R, K)))  # [B, H, N, C, K], natural-log units
    dz_prev = -dz.sum(-2)  # [B, H, N, K]
    ds_in = _mm(q_in.transpose(-1, -2), do_c, cdt).to(acc)  # [B, H, N, R·K, V]: direct share of each state

    # the state recurrence, back to front: d_local[n] = G_{n+1}, G_n = ds_in[n] + a_n ⊙ G_{n+1}
    z_end = z2[..., -1, :]
    a_k = torch.exp2(zp2 - z_end)  # [B, H, N, K]
    a = a_k.repeat(1, 1, 1, R).unsqueeze(-1)
    d_local = torch.empty_like(s_in)
    G = d_state
    for n in range(N - 1, -1, -1):
        d_local[:, :, n] = G
        G = torch.addcmul(ds_in[:, :, n], a[:, :, n], G)
    da = _sum_r((d_local * s_in).sum(-1).view(B, H, N, R, K)) * a_k  # ∂L/∂(z_prev − z_end)
    dz_prev += da
    dz_end = -da

    # chunk level: local chunk sums
    e_end = torch.exp2(z2 - z_end.unsqueeze(-2)).unsqueeze(-2)  # [B, H, N, C, 1, K]
    k_end = (k * e_end).view(B, H, N, C, R * K)
    dk_end = _mm(v_c, d_local.transpose(-1, -2), cdt).to(acc).view(B, H, N, C, R, K)
    dv += _mm(k_end, d_local, cdt)
    dk.addcmul_(dk_end, e_end)
    t = _sum_r(dk_end.mul_(k_end.view(B, H, N, C, R, K)))
    dz += t
    dz_end -= t.sum(-2)

    # halving levels
    L = 2
    for A in scores:
        h = L // 2
        nb = C // L
        qs, kf, e_s, e_f = _level_factors(q, k, z2, L)
        do_s = do_c.view(B, H, N, nb, 2, h, V)[:, :, :, :, 1]
        v_f = v_c.view(B, H, N, nb, 2, h, V)[:, :, :, :, 0]
        dA = _mm_small(do_s, v_f.transpose(-1, -2), cdt).to(acc)  # [.., nb, h_t, h_s]
        dv.view(B, H, N, nb, 2, h, V)[:, :, :, :, 0] += _mm_small(A.transpose(-1, -2), do_s, cdt)
        dqs = _mm_small(dA, kf.flatten(-2), cdt).to(acc).view(qs.shape)
        dkf = _mm_small(dA.transpose(-1, -2), qs.flatten(-2), cdt).to(acc).view(kf.shape)
        dq.view(B, H, N, nb, 2, h, R, K)[:, :, :, :, 1].addcmul_(dqs, e_s)
        dk.view(B, H, N, nb, 2, h, R, K)[:, :, :, :, 0].addcmul_(dkf, e_f)
        tq = _sum_r(dqs.mul_(qs))  # [.., nb, h, K]
        tk = _sum_r(dkf.mul_(kf))
        dzb = dz.view(B, H, N, nb, 2, h, K)
        dzb[:, :, :, :, 1] -= tq
        dzb[:, :, :, :, 0] += tk
        dzb[:, :, :, :, 0, -1] += tq.sum(-2) - tk.sum(-2)
        L *= 2

    dz[..., -1, :] += dz_end
    return dq, dk, dv, dz, dz_prev, G


# Chunks are processed in groups whose temporaries hold about this many elements (1 MiB in float32): they stay in
# cache, and the allocator reuses them instead of mapping fresh pages for every full-length temporary (2× faster
# than one group at 16K tokens). Causal LightNet fwd+bwd, 16K tokens × 4 heads of 64, 2 threads, two rounds:
# 2^16 476–550 ms, 2^17 273–438, 2^18 271–341, 2^19 297–370, 2^20 337–378 (2^17 was best with 1 thread).
GROUP_ELEMENTS = 1 << 18


class ChunkGatedCore(torch.autograd.Function):
    """`chunk_gated_core` with a hand-written backward (same math as `chunk_gated_core_autograd`).

    Works through the chunks in groups (`GROUP_ELEMENTS`), carrying the state from group to group (and its gradient
    back). Saves the inputs as given, the states entering every chunk and the intra-chunk score matrices; the
    decay factors are recomputed in backward. z is carried in log2 units (`exp(z_a − z_b) = 2^(z2_a − z2_b)`, the
    same bounds). Backward of each piece (`⊙` broadcast over the R copies, `Σ_R` sums them):

    - `s = t`: `o_t = (q_t·k_t) v_t`.
    - halving level: `A = q'k'ᵀ`, `o_2 += A v_1` with `q' = q_2 ⊙ e_2`, `k' = k_1 ⊙ e_1`, `e_2 = exp(z_m − z_2)`,
      `e_1 = exp(z_1 − z_m)`: `dA = do_2 v_1ᵀ`, `dv_1 += Aᵀ do_2`, `dq' = dA k'`, `dk' = dAᵀ q'`, and through the
      factors `dz_2 −= Σ_R dq'⊙q'`, `dz_1 += Σ_R dk'⊙k'`, `dz_m += Σ (dq'⊙q') − Σ (dk'⊙k')`.
    - chunk level: `o += q_in S_in` (`q_in = q ⊙ exp(z_prev − z)`), `S_{n+1} = a_n ⊙ S_n + k_endᵀ v`
      (`a = exp(z_prev − z_end)`, `k_end = k ⊙ exp(z − z_end)`): the state gradient runs backwards over chunks,
      `G_n = q_inᵀ do + a_n ⊙ G_{n+1}`, and the rest are batched matmuls.

    Outputs and gradients are allocated chunk-major (`[B, N, C, H, ...]` memory, `[B, H, N, C, ...]` view), the
    layout of the callers' `[B, T, H, ...]` tensors, so reshaping to and from chunks copies nothing.
    """

    @staticmethod
    def _group(q, k, v, z, z_prev, sl, acc):
        """One group of chunks of the inputs: contiguous, in the accumulation dtype, z in log2 units."""
        q, k, v = (x[:, :, sl].to(acc).contiguous() for x in (q, k, v))
        z2 = (z[:, :, sl].to(acc) * LOG2E).contiguous()
        return q, k, v, z2, z_prev[:, :, sl].to(acc) * LOG2E

    @staticmethod
    def forward(ctx, q, k, v, z, z_prev, s0, compute_dtype):
        B, H, N, C, R, K = q.shape
        V = v.shape[-1]
        cdt, acc = compute_dtype, _acc(compute_dtype)
        # groups pay off for CPU caches; elsewhere one group (fewer, larger kernels)
        G = max(1, min(N, GROUP_ELEMENTS // (B * H * C * R * max(K, V)))) if q.device.type == "cpu" else N
        o = q.new_empty(B, N, C, H, V, dtype=acc)
        state = s0.to(acc)
        saved = []
        with torch.no_grad():  # as in eager autograd.Function.forward; torch.export traces it with grad enabled
            for n0 in range(0, N, G):
                sl = slice(n0, n0 + G)
                qg, kg, vg, z2g, zp2g = ChunkGatedCore._group(q, k, v, z, z_prev, sl, acc)
                og, state, s_in, scores = _core_forward(qg, kg, vg, z2g, zp2g, state, cdt)
                o[:, sl].copy_(og.permute(0, 2, 3, 1, 4))
                saved += [s_in, *scores]
        ctx.save_for_backward(q, k, v, z, z_prev, *saved)
        ctx.compute_dtype, ctx.group = cdt, G
        return o.permute(0, 3, 1, 2, 4), state

    @staticmethod
    def backward(ctx, do, d_state):
        q, k, v, z, z_prev, *saved = ctx.saved_tensors
        cdt, G = ctx.compute_dtype, ctx.group
        acc = _acc(cdt)
        B, H, N, C, R, K = q.shape
        V = v.shape[-1]
        levels = C.bit_length() - 1
        dq, dk = (q.new_empty(B, N, C, H, R, K, dtype=acc) for _ in range(2))
        dv = q.new_empty(B, N, C, H, V, dtype=acc)
        dz = q.new_empty(B, N, C, H, K, dtype=acc)
        dz_prev = q.new_empty(B, N, H, K, dtype=acc)
        d_state = d_state.to(acc)
        starts = list(range(0, N, G))
        for i in reversed(range(len(starts))):
            sl = slice(starts[i], starts[i] + G)
            s_in, *scores = saved[i * (levels + 1):(i + 1) * (levels + 1)]
            qg, kg, vg, z2g, zp2g = ChunkGatedCore._group(q, k, v, z, z_prev, sl, acc)
            dog = do[:, :, sl].to(acc).contiguous()
            dqg, dkg, dvg, dzg, dzpg, d_state = _core_backward(qg, kg, vg, z2g, zp2g, s_in, scores, dog, d_state, cdt)
            dq[:, sl].copy_(dqg.permute(0, 2, 3, 1, 4, 5))
            dk[:, sl].copy_(dkg.permute(0, 2, 3, 1, 4, 5))
            dv[:, sl].copy_(dvg.permute(0, 2, 3, 1, 4))
            dz[:, sl].copy_(dzg.permute(0, 2, 3, 1, 4))
            dz_prev[:, sl].copy_(dzpg.permute(0, 2, 1, 3))
        return (dq.permute(0, 3, 1, 2, 4, 5), dk.permute(0, 3, 1, 2, 4, 5), dv.permute(0, 3, 1, 2, 4),
                dz.permute(0, 3, 1, 2, 4), dz_prev.permute(0, 2, 1, 3), d_state, None)



def chunk_gated_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: torch.Tensor,
    z_prev: torch.Tensor,
    initial_state: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel gated linear attention in log-normaliser coordinates; see `chunk_gated_core_autograd` for the
    math, shapes and returns. Runs `ChunkGatedCore` (hand-written backward)."""
    B, H, _, C, R, K = q.shape
    power_of_two("chunk_gated_core", "the chunk length", C)
    compute_dtype = core_dtype(q.device, compute_dtype)
    if initial_state is None:
        initial_state = q.new_zeros(B, H, R * K, v.shape[-1], dtype=_acc(compute_dtype))
    return ChunkGatedCore.apply(q, k, v, z, z_prev, initial_state, compute_dtype)


__all__ = [
    "GROUP_ELEMENTS",
    "NEG",
    "ChunkGatedCore",
    "chunk_gated_core",
    "chunk_gated_core_autograd",
    "chunk_len",
    "core_dtype",
    "from_chunks",
    "matmul_dtype",
    "pad_time",
    "to_chunks",
]
