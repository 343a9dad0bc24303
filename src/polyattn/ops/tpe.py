"""TPE and MD-TPE: data-independent exponentially decayed (Toeplitz) scans, one per grid axis, summed.

arXiv 2405.21022 (LightNet) §MD-TPE; spec shared/reference/lightnet.md §4.2–4.3, after the author's
`xmixers/modules/pes/tpe.py` and `md/md_tpe.py`. Per head h with decay `λ_h = exp(log_decay_h) ∈ (0, 1)`:

    causal:        u_t = λ u_{t−1} + x_t            = Σ_{s≤t} λ^{t−s} x_s
    two-sided:     u_t = Σ_s λ^{|t−s|} x_s          = forward scan + backward scan − x_t

Layout `[B, T, H, d]`; log-decays `[H]`; the scan state `[B, H, d]` is float32.
Padding: zero the padded inputs. Left padding (causal) and right padding (two-sided) then give exactly the
unpadded result, because the zeros sit on the far side of every real token.
"""

from collections.abc import Sequence

import torch

from .checks import check_float


def _check_x(op: str, x: torch.Tensor, log_decay: torch.Tensor) -> None:
    check_float(op, x=x, log_decay=log_decay)
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be [B, T, H, d] (4-D), got shape {tuple(x.shape)}")
    if log_decay.shape != (x.shape[2],):
        raise ValueError(f"{op}: log_decay must be [H] = [{x.shape[2]}], got shape {tuple(log_decay.shape)}")


def _decay_powers(log_decay: torch.Tensor, n: int) -> torch.Tensor:
    """`L[h, t, s] = λ_h^{t−s}` for s ≤ t, else 0: `[H, n, n]` float32 (exponents ≤ 0)."""
    idx = torch.arange(n, device=log_decay.device, dtype=torch.float32)
    diff = idx[:, None] - idx[None, :]
    expo = log_decay.float()[:, None, None] * diff.clamp_min(0)
    return torch.exp(expo) * (diff >= 0)


def tpe_causal_scan(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`u_t = λ_h u_{t−1} + x_t` without a Python loop: a Toeplitz matmul inside chunks, another across chunks.

    Args:
        x: `[B, T, H, d]`.
        log_decay: `[H]`, `log λ < 0`.
        initial_state: `u_0 [B, H, d]` float32, or None (zeros).
        chunk_size: chunk length (changes only round-off).

    Returns:
        `u [B, T, H, d]` in x's dtype and the final state `u_T [B, H, d]` float32.
    """
    _check_x("tpe_causal_scan", x, log_decay)
    B, T, H, d = x.shape
    if T == 0:
        state = x.new_zeros(B, H, d, dtype=torch.float32) if initial_state is None else initial_state.float()
        return x, state
    if chunk_size < 1:
        raise ValueError(f"tpe_causal_scan: chunk_size must be positive, got {chunk_size}")
    C = min(chunk_size, T)
    pad = -T % C
    xf = torch.cat([x.float(), x.new_zeros(B, pad, H, d, dtype=torch.float32)], dim=1) if pad else x.float()
    N = xf.shape[1] // C
    xc = xf.reshape(B, N, C, H, d).permute(0, 3, 1, 2, 4)  # [B, H, N, C, d]
    local = _decay_powers(log_decay, C)[None, :, None] @ xc  # [B, H, N, C, d]
    # state after each chunk: u_end_j = Σ_{i≤j} λ^{C(j−i)} local_end_i + λ^{C(j+1)} u_0
    across = _decay_powers(log_decay * C, N)  # [H, N, N]
    ends = across[None] @ local[:, :, :, -1]  # [B, H, N, d]
    ld = log_decay.float()[None, :, None, None]
    if initial_state is not None:
        steps = torch.arange(1, N + 1, device=x.device, dtype=torch.float32)[None, None, :, None]
        ends = ends + torch.exp(ld * C * steps) * initial_state.float().unsqueeze(2)
        first = initial_state.float().unsqueeze(2)
    else:
        first = ends.new_zeros(B, H, 1, d)
    entering = torch.cat([first, ends[:, :, :-1]], dim=2)  # [B, H, N, d]
    within = torch.arange(1, C + 1, device=x.device, dtype=torch.float32)[:, None]  # t − t0 + 1
    u = local + torch.exp(ld[..., None] * within) * entering.unsqueeze(3)
    u = u.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, d)[:, :T]
    # the final state is u at the last real token (zero padding at the end would decay it further)
    return u.to(x.dtype), u[:, -1].float()


def tpe_scan(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    direction: str = "causal",
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One TPE scan along dim 1: `direction` "causal" (`Σ_{s≤t} λ^{t−s} x_s`) or "bidirectional" (`λ^{|t−s|}`).

    Returns `(u [B, T, H, d], u_T [B, H, d] float32 | None)`; the state is returned (and `initial_state` accepted)
    for the causal direction only.
    """
    if direction == "causal":
        return tpe_causal_scan(x, log_decay, initial_state=initial_state, chunk_size=chunk_size)
    if direction != "bidirectional":
        raise ValueError(f"direction must be 'causal' or 'bidirectional', got {direction!r}")
    if initial_state is not None:
        raise ValueError("tpe_scan: a two-sided (bidirectional) scan has no carried state; pass initial_state=None")
    fwd, _ = tpe_causal_scan(x, log_decay, chunk_size=chunk_size)
    bwd, _ = tpe_causal_scan(x.flip(1), log_decay, chunk_size=chunk_size)
    return fwd + bwd.flip(1) - x, None


def tpe_axis_scan(
    x: torch.Tensor, grid_shape: Sequence[int], axis: int, log_decay: torch.Tensor, *, direction: str = "causal"
) -> torch.Tensor:
    """TPE along one axis of a row-major grid: `[B, N, H, d]` (N = Π grid_shape) → `[B, N, H, d]`.

    The axis is moved to the sequence position and every other axis folded into the batch (author's MdTpe).
    """
    B, N, H, d = x.shape
    g = x.reshape(B, *grid_shape, H, d).movedim(1 + axis, -3)  # [B, ...others, n_axis, H, d]
    shape = g.shape
    u, _ = tpe_scan(g.reshape(-1, *shape[-3:]), log_decay, direction=direction)
    return u.reshape(shape).movedim(-3, 1 + axis).reshape(B, N, H, d)


def md_tpe_scan(
    x: torch.Tensor, grid_shape: Sequence[int], log_decays: torch.Tensor, *, direction: str = "causal"
) -> torch.Tensor:
    """MD-TPE kernel: `Σ_a TPE_a(x)` over the axes of a row-major grid; `log_decays [k, H]` (one row per axis)."""
    out = 0
    for a in range(len(grid_shape)):
        out = out + tpe_axis_scan(x, grid_shape, a, log_decays[a], direction=direction)
    return out


def tpe_reference(x: torch.Tensor, log_decay: torch.Tensor, *, direction: str = "causal") -> torch.Tensor:
    """Explicit Toeplitz sums in float64: `Σ_s λ^{t−s} x_s` (s ≤ t) or `Σ_s λ^{|t−s|} x_s`."""
    T = x.shape[1]
    idx = torch.arange(T, device=x.device, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    if direction == "causal":
        w = torch.exp(log_decay.double()[:, None, None] * diff.clamp_min(0)) * (diff >= 0)
    else:
        w = torch.exp(log_decay.double()[:, None, None] * diff.abs())
    return torch.einsum("hts,bshd->bthd", w, x.double())


def tpe_matrix_reference(
    x: torch.Tensor, log_decay: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """The author's matrix-state kernel (causal): `s_t = λ s_{t−1} + k_h x_tᵀ` (d×d), `o_t = q_hᵀ s_t`.

    `q, k [H, d]`. It equals `(q_h · k_h) u_t` of the vector form; a token loop in float64.
    """
    B, T, H, d = x.shape
    lam = torch.exp(log_decay.double())[None, :, None, None]
    s = x.new_zeros(B, H, d, d, dtype=torch.float64)
    outs = []
    for t in range(T):
        s = lam * s + k.double()[None, :, :, None] * x[:, t].double()[:, :, None, :]
        outs.append(torch.einsum("hi,bhij->bhj", q.double(), s))
    return torch.stack(outs, dim=1)
