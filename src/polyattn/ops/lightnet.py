"""LightNet attention: additive linear recurrence, one scan for any number of dimensions.

arXiv 2405.21022 (Qin et al., "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet").
Spec: shared/reference/lightnet.md §2.

For every key channel `i` the key logits are soft-maxed over the (causal: prefix of the) token axis and used as
linear-attention weights:

    S_t[i, :] = Σ_{s≤t} exp(k_si) v_s / Σ_{s≤t} exp(k_si),    o_t = scale · q_tᵀ S_t

Causal: the log-normaliser `z_t = logcumsumexp_{s≤t}(k_s)` turns this into gated linear attention with
normalised keys `exp(k_t − z_t) ≤ 1` and log-decays `z_{t−1} − z_t ≤ 0`: no exponent is ever positive, so nothing
overflows for any length or key magnitude. Non-causal: `softmax(K over tokens)ᵀ V` once, then one matmul per
query: independent of the order in which a grid is flattened ("you only scan once").

Layouts: `q [B, T, H, R·K]`, `k [B, T, H, K]` (raw key logits), `v [B, T, H, V]`, optional
`key_features [B|1, T, H, R·K]`. With `R > 1` (cosine LRPE: R = 2) the normalised key weights of channel `i` are
repeated R times along the channel axis (copy r holds channel `r·K + i`) and multiplied by `key_features`
before entering the state, so every copy of a channel shares its decay (spec §4.1: this keeps relative
positions exact under the causal vector decay).

State (`LightNetState`, both float32 under any autocast):
- `S [B, H, R·K, V]`: the running matrix `Σ_{s≤t} exp(k_s − z_t) ⊙ f_s v_sᵀ` (normalised to `z`),
- `z [B, H, K]`: the log-normaliser `log(exp(z_0) + Σ_{s≤t} exp(k_s))`; −inf = empty.
"""

from typing import NamedTuple

import torch

from .checks import check_float, check_heads, check_mask
from .chunk_gated import NEG, chunk_gated_core, chunk_len, from_chunks, matmul_dtype, pad_time, to_chunks
from .sequence import pack_sequences, unpack_sequences


class LightNetState(NamedTuple):
    """Decoding state of one LightNet attention op (per layer): `S [B, H, R·K, V]`, `z [B, H, K]`, float32."""

    S: torch.Tensor
    z: torch.Tensor


def _initial(
    B: int, H: int, K: int, RK: int, V: int, initial_state: LightNetState | None, normalizer_init: str, like
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial `(S, z)` in float32 with −inf replaced by the finite `NEG` (see `chunk_gated.NEG`)."""
    if initial_state is not None:
        S0, z0 = initial_state
        return S0.float(), z0.float().clamp_min(NEG)
    if normalizer_init not in ("empty", "unit"):
        raise ValueError(f"normalizer_init must be 'empty' or 'unit', got {normalizer_init!r}")
    # "unit": a virtual key with logit 0 and a zero value (the author's LM code), so Δ_t = 1 + Σ exp(k_s)
    z0 = like.new_full((B, H, K), NEG if normalizer_init == "empty" else 0.0, dtype=torch.float32)
    return like.new_zeros(B, H, RK, V, dtype=torch.float32), z0


class PrefixLogSumExp(torch.autograd.Function):
    """The causal log-normaliser and the normalised keys of `k [B, T, H, K]` (float32) with `z_0 [B, H, K]`:
    `z_t = log(exp(z_0) + Σ_{s≤t} exp(k_s))` and `k̂_t = exp(k_t − z_t) ∈ (0, 1]`.

    Same values as `logaddexp(z_0, logcumsumexp(k, 1))`, at a fraction of the cost on a CPU: the scan runs as
    `chunk` sequential `logaddexp` steps, each over the same position of every chunk at once, then one
    `logcumsumexp` over the T/chunk chunk totals carries the prefix into every chunk. `logaddexp` is exact for
    any magnitudes (no reference value to pick, nothing to overflow).

    Backward, closed form: `∂z_t/∂k_s = exp(k_s − z_t)` for s ≤ t, and `k̂` adds `∂k̂_t/∂k_t = k̂_t`,
    `∂k̂_t/∂z_t = −k̂_t`. With `G = ∂L/∂z − k̂ ⊙ ∂L/∂k̂`: `∂L/∂k_s = k̂_s ⊙ (∂L/∂k̂_s + U_s)`, where
    `U_s = Σ_{t≥s} G_t exp(z_s − z_t) = G_s + exp(z_s − z_{s+1}) U_{s+1}` is a reversed scan with decays ≤ 1 (the
    same two-level layout), and `∂L/∂z_0 = exp(z_0 − z_1) U_1`.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, z0: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, K = k.shape
        C = min(chunk, T)
        N = -(-T // C)
        with torch.no_grad():  # as in eager autograd.Function.forward; torch.export traces it with grad enabled
            z, k_hat = PrefixLogSumExp._forward(k, z0, B, T, H, K, C, N)
        ctx.save_for_backward(z0, z, k_hat)
        ctx.chunk = C
        return z, k_hat

    @staticmethod
    def _forward(k, z0, B, T, H, K, C, N):
        kc = pad_time(k, N * C - T, NEG).view(B, N, C, H, K)
        loc = kc.new_empty(C, B, N, H, K)  # chunk-local prefix log-sums, position-major: every step is contiguous
        loc[0] = kc[:, :, 0]
        for c in range(1, C):
            torch.logaddexp(loc[c - 1], kc[:, :, c], out=loc[c])
        # z entering chunk j: z_0 and the totals of chunks < j
        enter = torch.logcumsumexp(torch.cat([z0.unsqueeze(1), loc[-1, :, :-1]], dim=1), dim=1)  # [B, N, H, K]
        z = torch.logaddexp(enter.unsqueeze(2), loc.permute(1, 2, 0, 3, 4), out=torch.empty_like(kc))
        z = z.reshape(B, N * C, H, K)[:, :T]
        return z, torch.sub(k, z).exp_()

    @staticmethod
    def backward(ctx, gz: torch.Tensor, gk: torch.Tensor):
        z0, z, k_hat = ctx.saved_tensors
        B, T, H, K = z.shape
        C = ctx.chunk
        N = -(-T // C)
        pad = N * C - T
        gk = gk.float() * k_hat  # the direct share, ∂L/∂k̂ ⊙ k̂
        g = pad_time(gz.float() - gk, pad).contiguous().view(B, N, C, H, K)  # G
        zc = (z if not pad else torch.cat([z, z[:, -1:].expand(B, pad, H, K)], dim=1)).view(B, N, C, H, K)
        u = g.new_empty(C, B, N, H, K)  # chunk-local U (nothing from later chunks yet), position-major
        u[-1] = g[:, :, -1]
        for c in range(C - 2, -1, -1):  # exp(z_s − z_{s+1}) ≤ 1
            torch.addcmul(g[:, :, c], torch.exp(zc[:, :, c] - zc[:, :, c + 1]), u[c + 1], out=u[c])
        u = u.permute(1, 2, 0, 3, 4)  # [B, N, C, H, K]
        # U at every chunk start, back to front: U_start(j) = u_start(j) + exp(z_start(j) − z_start(j+1)) U_start(j+1)
        z_start = zc[:, :, 0]  # [B, N, H, K]
        step = torch.exp(z_start[:, :-1] - z_start[:, 1:])
        carry = [u[:, -1, 0]]
        for j in range(N - 2, -1, -1):
            carry.append(torch.addcmul(u[:, j, 0], step[:, j], carry[-1]))
        u_next = torch.stack([*carry[::-1][1:], torch.zeros_like(carry[0])], dim=1)  # U entering from chunk j+1
        z_next = torch.cat([z_start[:, 1:], zc[:, -1:, -1]], dim=1)  # last chunk: its own end (u_next = 0 there)
        # U = u + exp(z − z_next) U_next, in G's buffer (in-place ops: no fresh full-length temporaries)
        u = g.copy_(zc).sub_(z_next.unsqueeze(2)).exp_().mul_(u_next.unsqueeze(2)).add_(u)
        u = u.view(B, N * C, H, K)[:, :T]
        dk = gk.addcmul_(k_hat, u)
        dz0 = torch.exp(z0 - z[:, 0]) * u[:, 0]
        return dk, dz0, None


def _key_weights(k_hat: torch.Tensor, R: int, key_features: torch.Tensor | None) -> torch.Tensor:
    """Normalised key weights `[B, T, H, K]` → `[B, T, H, R, K]` (R copies times the key features)."""
    kw = k_hat.unsqueeze(-2).expand(*k_hat.shape[:-1], R, k_hat.shape[-1])
    if key_features is not None:
        kw = kw * key_features.float().unflatten(-1, (R, -1))
    return kw


def _public_state(S: torch.Tensor, z: torch.Tensor) -> LightNetState:
    """Maps the internal finite stand-in back to −inf so the returned log-normaliser reads as documented."""
    return LightNetState(S, torch.where(z <= NEG / 2, -torch.inf, z))


def _check(q, k, v, key_features, mask=None):
    B, T, _ = check_heads("lightnet_attn", q=q, k=k, v=v)
    check_float("lightnet_attn", key_features=key_features)
    check_mask("lightnet_attn", mask, B, T)
    K = k.shape[-1]
    if K == 0 or q.shape[-1] % K:
        raise ValueError(f"lightnet_attn: q has {q.shape[-1]} channels, not a multiple of the {K} key channels")
    R = q.shape[-1] // K
    if R != 1 and key_features is None:
        raise ValueError("lightnet_attn: q wider than k needs key_features (e.g. cosine LRPE)")
    return R


def _inputs(q, k, v, initial_state, normalizer_init, key_features, mask):
    """What every fast form starts from, once the arguments are checked: `R` (copies of each key channel), the
    key logits in float32 with padded keys at `NEG` ("−inf" before the normaliser, so they carry no weight
    anywhere), the values with padded ones zeroed, and the initial `(S, z)`."""
    R = _check(q, k, v, key_features, mask)
    B, _, H, K = k.shape
    S0, z0 = _initial(B, H, K, R * K, v.shape[-1], initial_state, normalizer_init, k)
    kf = k.float()
    if mask is not None:
        kf = kf.masked_fill(~mask[:, :, None, None], NEG)
        v = v.masked_fill(~mask[:, :, None, None], 0)
    return R, kf, v, S0, z0


def _empty(v, S0, z0, output_final_state) -> tuple[torch.Tensor, LightNetState | None]:
    """T = 0: an empty output, and the state is the one passed in (or the empty state)."""
    B, _, H, V = v.shape
    return v.new_zeros(B, 0, H, V), (_public_state(S0, z0) if output_final_state else None)


def _result(o, dtype, mask, S, z, output_final_state) -> tuple[torch.Tensor, LightNetState | None]:
    """The output of a fast form, zero at padded positions and in the values' dtype, and the final state if asked."""
    if mask is not None:
        o = o.masked_fill(~mask[:, :, None, None], 0.0)
    return o.to(dtype), (_public_state(S, z) if output_final_state else None)


def _chunk_on_backend(q, kw, v, z, z0, S0, R, scale, mask, output_final_state, backend):
    """The causal core as gated linear attention on an external kernel (`polyattn.ops.gla_backends`): keys are the
    normalised key weights, log-decays `z_{t−1} − z_t` (≤ 0, repeated over the R copies of each channel)."""
    from .gla_backends import get_backend

    run = get_backend(backend, q.device)
    z_before = torch.cat([z0.unsqueeze(1), z[:, :-1]], dim=1)  # z_{t−1}, with z_0 before the first token
    g = (z_before - z).repeat(1, 1, 1, R)  # [B, T, H, R·K]; copy r of channel i sits at r·K + i, as in kw
    cdt = matmul_dtype(q, v)
    o, S = run(q.to(cdt), kw.flatten(-2).to(cdt), v.to(cdt), g, S0)  # kw [B, T, H, R, K] → R·K channels
    if scale != 1.0:
        o = o * scale
    return _result(o, v.dtype, mask, S.float(), z[:, -1], output_final_state)


def lightnet_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: LightNetState | None = None,
    output_final_state: bool = False,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    normalizer_init: str = "empty",
    key_features: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, LightNetState | None]:
    """Causal LightNet attention, chunk-parallel (training / prefill). Arguments as `lightnet_attn`."""
    R, kf, v, S0, z0 = _inputs(q, k, v, initial_state, normalizer_init, key_features, mask)
    B, T, H, K = k.shape
    if T == 0:
        return _empty(v, S0, z0, output_final_state)
    C = chunk_len("lightnet_attn", chunk_size, T)
    z, k_hat = PrefixLogSumExp.apply(kf, z0, C)  # [B, T, H, K] float32; k_hat = exp(k − z) ∈ (0, 1]
    if mask is not None:
        k_hat = k_hat.masked_fill(~mask[:, :, None, None], 0.0)  # leading pads have z = k = NEG: exp(0) = 1
    kw = _key_weights(k_hat, R, key_features)
    if backend != "torch":
        return _chunk_on_backend(q, kw, v, z, z0, S0, R, scale, mask, output_final_state, backend)

    pad = -T % C
    if pad:
        z = torch.cat([z, z[:, -1:].expand(B, pad, H, K)], dim=1)  # no keys in the padding: z stays put
    qc = to_chunks(q, C).unflatten(-1, (R, K))  # the core casts chunk groups as it goes
    kc = to_chunks(kw, C)
    vc = to_chunks(v, C)
    zc = to_chunks(z, C)  # [B, H, N, C, K]
    z_prev = torch.cat([z0.unsqueeze(2), zc[:, :, :-1, -1]], dim=2)  # the state entering chunk j: z at its start
    o, S = chunk_gated_core(qc, kc, vc, zc, z_prev, S0, matmul_dtype(q, v))
    o = from_chunks(o, T)
    if scale != 1.0:
        o = o * scale
    return _result(o, v.dtype, mask, S, z[:, -1], output_final_state)


def lightnet_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: LightNetState | None = None,
    output_final_state: bool = False,
    mask: torch.Tensor | None = None,
    normalizer_init: str = "empty",
    key_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LightNetState | None]:
    """Causal LightNet attention token by token (decoding; spec §2.4). Arguments as `lightnet_attn`.

    One step: `z' = logaddexp(z, k_t)`, `S ← exp(z − z') ⊙ S + exp(k_t − z') ⊙ f_t v_tᵀ`, `o_t = scale·q_tᵀ S`.
    """
    R, kf, v, S, z = _inputs(q, k, v, initial_state, normalizer_init, key_features, mask)
    B, T, H, K = k.shape
    if T == 0:
        return _empty(v, S, z, output_final_state)
    vf = v.float()
    feats = None if key_features is None else key_features.expand(B, T, H, R * K)
    outs = []
    for t in range(T):
        z_new = torch.logaddexp(z, kf[:, t])
        k_hat = torch.exp(kf[:, t] - z_new)
        if mask is not None:
            k_hat = k_hat * mask[:, t, None, None]
        kw = _key_weights(k_hat, R, None if feats is None else feats[:, t]).flatten(-2)  # [B, H, R·K]
        decay = torch.exp(z - z_new).repeat(1, 1, R)
        S = decay.unsqueeze(-1) * S + kw.unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        z = z_new
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    o = torch.stack(outs, dim=1) * scale
    return _result(o, v.dtype, mask, S, z, output_final_state)


def _sum_copies(x: torch.Tensor, R: int, K: int) -> torch.Tensor:
    """Sums the R copies of every key channel (`[..., R·K]` → `[..., K]`; copy r holds channel `r·K + i`)."""
    return x.unflatten(-1, (R, K)).sum(-2)


# Tokens per block of the non-causal form: blocks of about this many elements per sample (1 MiB in float32) stay in
# cache between the exponential and the matrix products that use it, so long inputs cost the same per token as short
# ones instead of streaming every full-length temporary through memory.
GLOBAL_BLOCK_ELEMENTS = 1 << 18


class GlobalLightNet(torch.autograd.Function):
    """Non-causal LightNet with a hand-written backward, in cache-sized blocks of tokens.

    Forward: `z = log(exp(z_0) + Σ_t exp(k_t))` (one pass over the keys), then per block `P_t = exp(k_t − z)`,
    `S = Σ_t (P_t ⊙ f_t) v_tᵀ + exp(z_0 − z) S_0`, and per block `o_t = scale · q_tᵀ S`. Nothing of length T is
    stored besides the inputs: backward recomputes `P` block by block.

    Backward, with `dS = scale Σ_t q_t do_tᵀ + ∂L/∂S` (the final state's own gradient), `c = Σ_R Σ_v dS ⊙ S`
    (per key channel; this is `Σ_t P_t dP_t + w_0 dw_0` of the softmax over {k_t} ∪ {z_0}, no pass over T
    needed) and `w_0 = exp(z_0 − z)`: `dq_t = scale · S do_t`, `dv_t = dSᵀ (P_t ⊙ f_t)`,
    `dP_t = Σ_R f_t ⊙ dS v_t`, `dk_t = P_t ⊙ (dP_t − c + ∂L/∂z)`, `df_t = P_t ⊙ dS v_t`, `dS_0 = w_0 dS`,
    `dz_0 = w_0 ⊙ (Σ_R Σ_v dS ⊙ S_0 − c + ∂L/∂z)`.
    """

    @staticmethod
    def forward(ctx, q, kf, v, features, S0, z0, mask, scale, compute_dtype):
        B, T, H, K = kf.shape
        RK, V = q.shape[-1], v.shape[-1]
        cdt, step = compute_dtype, GlobalLightNet._block(q, H, max(RK, V))
        with torch.no_grad():  # as in eager autograd.Function.forward; torch.export traces it with grad enabled
            z = torch.logaddexp(z0, torch.logsumexp(kf, dim=1))  # [B, H, K]
            w0 = torch.exp(z0 - z)
            S = w0.repeat(1, 1, RK // K).unsqueeze(-1) * S0  # float32; the blocks' shares are added to it
            for t0 in range(0, T, step):
                kw = GlobalLightNet._key_weights(kf, z, features, mask, t0, step, RK)
                S += torch.einsum("bthj,bthv->bhjv", kw.to(cdt), v[:, t0:t0 + step].to(cdt)).float()
            S_c = S.to(cdt)
            o = q.new_empty(B, T, H, V, dtype=torch.float32)
            for t0 in range(0, T, step):
                o[:, t0:t0 + step] = torch.einsum("bthj,bhjv->bthv", q[:, t0:t0 + step].to(cdt), S_c)
            if scale != 1.0:
                o *= scale
        ctx.save_for_backward(q, kf, v, features, S0, z0, mask, z, S)
        ctx.scale, ctx.compute_dtype, ctx.step = scale, cdt, step
        return o, S, z

    @staticmethod
    def _block(q, H, width):
        """Tokens per block: about GLOBAL_BLOCK_ELEMENTS per sample and tensor on a CPU (independent of the batch
        size, which torch.export keeps symbolic); everything at once elsewhere."""
        if q.device.type != "cpu":
            return max(q.shape[1], 1)
        return max(1, GLOBAL_BLOCK_ELEMENTS // (H * width))

    @staticmethod
    def _normalised(kf, z, mask, t0, step):
        """`P = exp(k − z)` of one block `[B, t, H, K]`; zero on padding (a fully padded row has z = k)."""
        P = torch.exp(kf[:, t0:t0 + step] - z.unsqueeze(1))
        if mask is not None:
            P = P.masked_fill(~mask[:, t0:t0 + step, None, None], 0.0)
        return P

    @staticmethod
    def _key_weights(kf, z, features, mask, t0, step, RK):
        P = GlobalLightNet._normalised(kf, z, mask, t0, step)
        return P if features is None else _key_weights(P, RK // P.shape[-1], features[:, t0:t0 + step]).flatten(-2)

    @staticmethod
    def backward(ctx, do, dS_out, dz_out):
        q, kf, v, features, S0, z0, mask, z, S = ctx.saved_tensors
        scale, cdt, step = ctx.scale, ctx.compute_dtype, ctx.step
        T, K = kf.shape[1], kf.shape[3]
        RK = q.shape[-1]
        R = RK // K
        do_c = do.to(cdt)
        dS = dS_out.float().clone()  # autograd passes zeros for unused outputs (materialize_grads)
        for t0 in range(0, T, step):
            dS += scale * torch.einsum("bthj,bthv->bhjv", q[:, t0:t0 + step].to(cdt), do_c[:, t0:t0 + step]).float()
        dz = dz_out.float()
        c = _sum_copies((dS * S).sum(-1), R, K)  # [B, H, K]
        S_c, dS_c = S.to(cdt), dS.to(cdt)
        need_q, need_k, need_v, need_f = ctx.needs_input_grad[:4]
        dq = q.new_empty(q.shape, dtype=torch.float32) if need_q else None
        dk = torch.empty_like(kf) if need_k else None
        dv = v.new_empty(v.shape, dtype=torch.float32) if need_v else None
        df = torch.empty_like(features, dtype=torch.float32) if need_f else None
        for t0 in range(0, T, step):
            sl = slice(t0, t0 + step)
            if need_q:
                dq[:, sl] = torch.einsum("bthv,bhjv->bthj", do_c[:, sl], S_c)
            if not (need_k or need_v or need_f):
                continue
            P = GlobalLightNet._normalised(kf, z, mask, t0, step)
            kw = P if features is None else _key_weights(P, R, features[:, sl]).flatten(-2)
            if need_v:
                dv[:, sl] = torch.einsum("bthj,bhjv->bthv", kw.to(cdt), dS_c)
            if need_k or need_f:
                dkw = torch.einsum("bthv,bhjv->bthj", v[:, sl].to(cdt), dS_c).float()  # ∂L/∂(P ⊙ f)
                if need_f:
                    df[:, sl] = dkw * P.repeat(1, 1, 1, R)
                if need_k:
                    dP = dkw if features is None else dkw.mul_(features[:, sl])
                    dk[:, sl] = P * (_sum_copies(dP, R, K) - (c - dz).unsqueeze(1))
        if need_q and scale != 1.0:
            dq *= scale
        w0 = torch.exp(z0 - z)
        dS0 = w0.repeat(1, 1, R).unsqueeze(-1) * dS
        dz0 = w0 * (_sum_copies((dS * S0).sum(-1), R, K) - c + dz)
        return dq, dk, dv, df, dS0, dz0, None, None, None


def lightnet_global(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: LightNetState | None = None,
    output_final_state: bool = False,
    mask: torch.Tensor | None = None,
    normalizer_init: str = "empty",
    key_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LightNetState | None]:
    """Non-causal LightNet attention: `O = scale · Q (softmax_tokens(K) ⊙ F)ᵀ V` (two matmuls, one pass).

    An `initial_state` acts as keys seen before this call (the state is the same as the causal one after the
    last token). Runs `GlobalLightNet` (blocked, hand-written backward). Arguments as `lightnet_attn`.
    """
    R, kf, v, S0, z0 = _inputs(q, k, v, initial_state, normalizer_init, key_features, mask)
    B, T, H, K = k.shape
    if T == 0:
        return _empty(v, S0, z0, output_final_state)
    features = None if key_features is None else key_features.float().expand(B, T, H, R * K)
    o, S, z = GlobalLightNet.apply(q, kf, v, features, S0, z0, mask, scale, matmul_dtype(q, v))
    return _result(o, v.dtype, mask, S, z, output_final_state)


def lightnet_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float = 1.0,
    initial_state: LightNetState | None = None,
    mask: torch.Tensor | None = None,
    normalizer_init: str = "empty",
    key_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LightNetState]:
    """Direct normalised sums in float64 (obviously correct, O(T²·K·V)); for tests.

    `o_t = scale Σ_j q_tj [Σ_s exp(k_s,i(j) − z_t,i(j)) f_sj v_s + exp(z_0 − z_t) S0_j]` with
    `z_t = log(exp(z_0) + Σ_s exp(k_s))`, s ≤ t when causal and over all s otherwise; `i(j) = j mod K`.
    The normaliser is formed in log space (float64 `logcumsumexp`/`logsumexp`) so that keys of any magnitude stay
    representable; the weights are then the plain quotients `exp(k_s) / Σ exp(k)`.
    """
    R = _check(q, k, v, key_features, mask)
    B, T, H, K = k.shape
    V = v.shape[-1]
    S0, z0 = _initial(B, H, K, R * K, V, initial_state, normalizer_init, k)
    if T == 0:
        o, state = _empty(v, S0, z0, True)
        return o.double(), LightNetState(state.S.double(), state.z.double())
    q, k, v, S0, z0 = q.double(), k.double(), v.double(), S0.double(), z0.double()
    z0 = torch.where(z0 <= NEG / 2, -torch.inf, z0)
    if mask is not None:
        k = k.masked_fill(~mask[:, :, None, None], -torch.inf)
        v = v.masked_fill(~mask[:, :, None, None], 0.0)
    if causal:
        z = torch.logaddexp(z0.unsqueeze(1), torch.logcumsumexp(k, dim=1))  # [B, T, H, K]
        sel = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
    else:
        z = torch.logaddexp(z0, torch.logsumexp(k, dim=1)).unsqueeze(1).expand(B, T, H, K)
        sel = torch.ones(T, T, dtype=torch.bool, device=k.device)
    live = torch.isfinite(z)  # an empty sum (leading pads, fully padded row) gives weight 0, not NaN
    f = torch.ones(1, T, H, R * K, dtype=torch.float64, device=k.device) if key_features is None else (
        key_features.double())
    # w[b, t, s, h, j] = exp(k_s − z_t) f_s  (channel j = r·K + i shares key channel i)
    expo = k[:, None] - z[:, :, None]  # [B, T, S, H, K]
    keep = sel[None, :, :, None, None] & live[:, :, None] & torch.isfinite(k)[:, None]
    w = torch.exp(torch.where(keep, expo, -torch.inf)).repeat(1, 1, 1, 1, R) * f[:, None]
    o = torch.einsum("bthj,btshj,bshv->bthv", q, w, v)
    share0 = torch.exp(torch.where(live & torch.isfinite(z0).unsqueeze(1), z0.unsqueeze(1) - z, -torch.inf))
    share0 = share0.repeat(1, 1, 1, R)  # [B, T, H, R·K]
    o = o + torch.einsum("bthj,bthj,bhjv->bthv", q, share0, S0)
    S_T = torch.einsum("bshj,bshv->bhjv", w[:, -1], v) + share0[:, -1].unsqueeze(-1) * S0
    o = o * scale
    if mask is not None:
        o = o.masked_fill(~mask[:, :, None, None], 0.0)
    return o, LightNetState(S_T, z[:, -1])


def lightnet_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    initial_state: LightNetState | None = None,
    output_final_state: bool = False,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    normalizer_init: str = "empty",
    key_features: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, LightNetState | None]:
    """LightNet attention (arXiv 2405.21022): per-channel softmax of the key logits over tokens, then linear attention.

    Args:
        q: queries `[B, T, H, R·K]`, used as given (the layer applies SiLU and LRPE).
        k: raw key logits `[B, T, H, K]` (no activation: the key is the decay input).
        v: values `[B, T, H, V]`.
        causal: prefix softmax (chunked parallel; the single-token recurrent step when T == 1) or the global
            one-scan form.
        scale: output scale; None → 1 (the authors' choice; a following RMSNorm makes it nearly irrelevant).
        initial_state: `LightNetState(S [N, H, R·K, V], z [N, H, K])` float32 from a previous call (N = B, or the
            number of packed sequences), or None.
        output_final_state: also return the state after the last token.
        mask: `[B, T]` bool, True = real token. Masked keys get zero weight, also in the normaliser; outputs at
            masked positions are zero. Left padding (causal) and right padding (either form) are exact.
        chunk_size: chunk length of the causal parallel form, a power of two; it changes only round-off.
        normalizer_init: "empty" (`z_0 = −inf`, the paper's formula) or "unit" (`z_0 = 0`: a virtual key with logit
            0 and value 0, as in the author's LM code). Ignored when `initial_state` is given.
        key_features: `[B|1, T, H, R·K]` multipliers of the (R times repeated) normalised key weights, e.g.
            `[cos Θ_s, sin Θ_s]` for cosine LRPE; None → ones (then q must have K channels).
        cu_seqlens: `[N + 1]` int offsets of N sequences packed along T with B == 1 (flash-attn varlen). Uses
            data-dependent shapes: eager mode only.
        backend: kernel of the causal chunked form: "torch" (polyattn's chunked PyTorch core, the default and
            the reference) or a gated-linear-attention backend of `polyattn.ops.gla_backends` ("fla": flash-linear-
            attention's Triton kernel, CUDA only). The decoding step and the non-causal form always use PyTorch.

    Returns:
        `o [B, T, H, V]` in the dtype of `v`, and the final `LightNetState` (float32) or None.
    """
    scale = 1.0 if scale is None else scale
    if cu_seqlens is not None:
        if q.shape[0] != 1 or mask is not None:
            raise ValueError("lightnet_attn: packed sequences (cu_seqlens) need B == 1 and no mask (padding is "
                             "implied by the boundaries)")
        qp, mask_p = unpack_sequences(q, cu_seqlens)
        kp, vp = unpack_sequences(k, cu_seqlens)[0], unpack_sequences(v, cu_seqlens)[0]
        fp = None
        if key_features is not None:
            fp = unpack_sequences(key_features.expand(1, *q.shape[1:]), cu_seqlens)[0]
        o, state = lightnet_attn(qp, kp, vp, causal=causal, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, mask=mask_p, chunk_size=chunk_size,
                                 normalizer_init=normalizer_init, key_features=fp, backend=backend)
        return pack_sequences(o, mask_p), state
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state, mask=mask,
              normalizer_init=normalizer_init, key_features=key_features)
    if not causal:
        return lightnet_global(q, k, v, **kw)
    if q.shape[1] == 1:  # static shape: a decoding step
        return lightnet_recurrent(q, k, v, **kw)
    return lightnet_chunk(q, k, v, chunk_size=chunk_size, backend=backend, **kw)
