"""LightNet attention op: every form against the float64 direct sums, forward and backward (spec §9.1–9.5, 9.9)."""

import pytest
import torch

from polyattn.ops import chunk_gated
from polyattn.ops import lightnet as lightnet_ops
from polyattn.ops.lightnet import (
    LightNetState,
    PrefixLogSumExp,
    lightnet_attn,
    lightnet_chunk,
    lightnet_global,
    lightnet_recurrent,
    lightnet_reference,
)
from polyattn.ops.lrpe import lrpe_cosine, lrpe_key_features, lrpe_theta, md_lrpe_angles
from polyattn.ops.sequence import grid_positions
from polyattn.testing import assert_close

B, H, K, V = 2, 2, 8, 6


def make(T, seed=42, key_scale=2.0, R=1, state=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, R * K, generator=g, dtype=dtype)
    k = (torch.randn(B, T, H, K, generator=g) * key_scale).to(dtype)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    s0 = None
    if state:
        s0 = LightNetState(torch.randn(B, H, R * K, V, generator=g), torch.randn(B, H, K, generator=g))
    return q, k, v, s0


def run_with_grads(fn, q, k, v, s0, seed=7):
    """Output, final state and grads of `(o·do).sum() + (S_T·dS).sum() + (z_T·dz).sum()` (random upstream grads)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    st = None
    if s0 is not None:
        st = LightNetState(*(x.detach().clone().requires_grad_() for x in s0))
        leaves += list(st)
    o, state = fn(*leaves[:3], st)
    g = torch.Generator().manual_seed(seed)
    loss = (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
    loss = loss + (state.S.double() * torch.randn(state.S.shape, generator=g, dtype=torch.float64)).sum()
    z_fin = torch.nan_to_num(state.z.double(), neginf=0.0)
    loss = loss + (z_fin * torch.randn(state.z.shape, generator=g, dtype=torch.float64)).sum()
    loss.backward()
    return [o, state.S, z_fin] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


NAMES = ["o", "S", "z", "dq", "dk", "dv", "dS0", "dz0"]


def compare(ref_fn, fn, q, k, v, s0, ratio=2e-5, atol=2e-5):
    ref = run_with_grads(ref_fn, q, k, v, s0)
    out = run_with_grads(fn, q, k, v, s0)
    for name, r, x in zip(NAMES, ref, out):
        assert_close(name, r, x, ratio=ratio, atol=atol)


@pytest.mark.parametrize("T", [1, 63, 100, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk", [16, 32, 64], ids=lambda c: f"C{c}")
def test_chunk_matches_reference(T, chunk):
    q, k, v, s0 = make(T, state=True)
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=True, initial_state=s),
            lambda q, k, v, s: lightnet_chunk(q, k, v, initial_state=s, output_final_state=True, chunk_size=chunk),
            q, k, v, s0)


@pytest.mark.parametrize("T", [1, 63, 100], ids=lambda t: f"T{t}")
def test_recurrent_matches_reference(T):
    q, k, v, s0 = make(T, state=True)
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=True, initial_state=s),
            lambda q, k, v, s: lightnet_recurrent(q, k, v, initial_state=s, output_final_state=True),
            q, k, v, s0)


@pytest.mark.parametrize("T", [1, 63, 257], ids=lambda t: f"T{t}")
def test_global_matches_reference(T):
    q, k, v, s0 = make(T, state=True)
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=False, initial_state=s),
            lambda q, k, v, s: lightnet_global(q, k, v, initial_state=s, output_final_state=True),
            q, k, v, s0)


def test_reference_is_the_normalised_sum():
    """The reference against the literal formula of §2.1 (one channel, explicit loops)."""
    q, k, v, _ = make(9)
    o, _ = lightnet_reference(q, k, v, causal=True, scale=0.5)
    b, h, t = 1, 1, 6
    S = torch.zeros(K, V, dtype=torch.float64)
    for i in range(K):
        w = torch.exp(k[b, : t + 1, h, i].double())
        S[i] = (w[:, None] * v[b, : t + 1, h].double()).sum(0) / w.sum()
    assert_close("o_t", 0.5 * q[b, t, h].double() @ S, o[b, t, h], atol=1e-12)


def test_chunk_size_changes_nothing_beyond_roundoff():
    q, k, v, _ = make(200, key_scale=5.0)
    outs = [lightnet_chunk(q, k, v, chunk_size=c)[0] for c in (1, 8, 16, 64, 128, 256)]
    for o in outs[1:]:
        assert_close("o", outs[0], o, ratio=1e-5, atol=1e-5)


def test_unit_normalizer_is_an_extra_one_in_the_denominator():
    q, k, v, _ = make(50)
    o, st = lightnet_attn(q, k, v, causal=True, normalizer_init="unit", output_final_state=True)
    e = torch.exp(k.double())
    num = torch.einsum("bshi,bshv->bshiv", e, v.double()).cumsum(1)
    den = 1 + e.cumsum(1)
    expect = torch.einsum("bthi,bthiv->bthv", q.double(), num / den[..., None])
    assert_close("o", expect, o, atol=1e-5)
    assert_close("z", torch.log(den[:, -1]), st.z, atol=1e-5)
    ref, _ = lightnet_reference(q, k, v, causal=True, normalizer_init="unit")
    assert_close("o vs reference", ref, o, atol=1e-5)
    og, _ = lightnet_attn(q, k, v, causal=False, normalizer_init="unit")
    refg, _ = lightnet_reference(q, k, v, causal=False, normalizer_init="unit")
    assert_close("global", refg, og, atol=1e-5)


def test_stable_for_huge_key_logits():
    """|k| ≥ 80 (exp overflows float32 at 88): finite, and equal to the float64 reference, forward and backward.

    The tolerance is looser than elsewhere: at |z| ~ 300 one float32 ulp of the log-normaliser is ~3e-5, which
    the softmax-style key gradient amplifies to a relative RMSE of a few 1e-4.
    """
    q, k, v, _ = make(300, key_scale=80.0)
    k = k.sign() * k.abs().clamp_min(80.0)  # every |k| ≥ 80, up to ~300
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=True),
            lambda q, k, v, s: lightnet_chunk(q, k, v, output_final_state=True),
            q, k, v, None, ratio=1e-3)
    o, _ = lightnet_global(q, k, v)
    assert torch.isfinite(o).all()
    # far beyond: |k| up to ~3e4, every form stays finite forward and backward
    leaves = [x.clone().requires_grad_() for x in (q, k * 100, v)]
    for fn in (lightnet_chunk, lightnet_global, lightnet_recurrent):
        o, st = fn(*leaves, output_final_state=True)
        (o.sum() + st.S.sum()).backward()
        assert torch.isfinite(o).all() and all(torch.isfinite(x.grad).all() for x in leaves)


def test_bfloat16_autocast_within_tolerance():
    """Documented tolerance: relative RMSE ≤ 2e-2 against float32 (bf16 matmul operands, float32 state)."""
    q, k, v, _ = make(257, key_scale=3.0)
    ref, ref_state = lightnet_chunk(q, k, v, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, state = lightnet_chunk(q, k, v, output_final_state=True)
        og, _ = lightnet_global(q, k, v)
    assert state.S.dtype == torch.float32 and state.z.dtype == torch.float32
    assert_close("o", ref, o, ratio=2e-2, atol=0)
    assert_close("S", ref_state.S, state.S, ratio=2e-2, atol=0)
    assert_close("global", lightnet_global(q, k, v)[0], og, ratio=2e-2, atol=0)
    ob, sb = lightnet_chunk(q.bfloat16(), k.bfloat16(), v.bfloat16(), output_final_state=True)
    assert ob.dtype == torch.bfloat16 and sb.S.dtype == torch.float32
    assert_close("bf16 inputs", ref, ob, ratio=3e-2, atol=0)


def test_split_and_resume_equals_one_call():
    q, k, v, _ = make(150)
    full, st = lightnet_attn(q, k, v, causal=True, output_final_state=True)
    for split in (1, 37, 64, 149):
        o1, s1 = lightnet_attn(q[:, :split], k[:, :split], v[:, :split], causal=True, output_final_state=True)
        o2, s2 = lightnet_attn(q[:, split:], k[:, split:], v[:, split:], causal=True, initial_state=s1,
                               output_final_state=True)
        assert_close("o", full, torch.cat([o1, o2], 1), atol=1e-5)
        assert_close("S", st.S, s2.S, atol=1e-5)
        assert_close("z", st.z, s2.z, atol=1e-5)
    # token by token through the decoding step
    state, outs = None, []
    for t in range(20):
        o, state = lightnet_attn(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], causal=True, initial_state=state,
                                 output_final_state=True)
        outs.append(o)
    assert_close("decode", full[:, :20], torch.cat(outs, 1), atol=1e-5)


def test_noncausal_is_final_causal_state_applied_to_every_query():
    q, k, v, _ = make(70)
    _, st = lightnet_chunk(q, k, v, output_final_state=True)
    og, sg = lightnet_global(q, k, v, output_final_state=True)
    assert_close("o", torch.einsum("bthk,bhkv->bthv", q, st.S), og, atol=1e-5)
    assert_close("z", st.z, sg.z, atol=1e-5)


def test_noncausal_with_md_lrpe_is_independent_of_flattening_order():
    """Row-major vs column-major flattening (coordinates permuted consistently) gives the same per-token outputs."""
    h, w = 5, 7
    q, k, v, _ = make(h * w, R=1)
    pos = grid_positions((h, w))
    angles = md_lrpe_angles(pos, lrpe_theta(K, H, num_axes=2), K)[None]  # [1, T, H, K]
    out_row, _ = lightnet_global(lrpe_cosine(q, angles), k, v, key_features=lrpe_key_features(angles))
    perm = torch.arange(h * w).view(h, w).t().reshape(-1)  # column-major order of the same tokens
    out_col, _ = lightnet_global(lrpe_cosine(q[:, perm], angles[:, perm]), k[:, perm], v[:, perm],
                                 key_features=lrpe_key_features(angles[:, perm]))
    assert_close("per-token outputs", out_row[:, perm], out_col, atol=1e-5)


def test_lrpe_features_match_reference_all_forms():
    T = 70
    q, k, v, s0 = make(T, R=2, state=True)
    angles = md_lrpe_angles(torch.arange(T, dtype=torch.float32)[:, None], lrpe_theta(K, H), K)[None]
    feats = lrpe_key_features(angles)
    for causal, fn in ((True, lightnet_chunk), (True, lightnet_recurrent), (False, lightnet_global)):
        compare(lambda q, k, v, s, c=causal: lightnet_reference(q, k, v, causal=c, initial_state=s, key_features=feats),
                lambda q, k, v, s, f=fn: f(q, k, v, initial_state=s, output_final_state=True, key_features=feats),
                q, k, v, s0)


def test_left_padding_equals_unpadded_causal():
    q, k, v, _ = make(40)
    lens = [40, 23]
    mask = torch.zeros(B, 40, dtype=torch.bool)
    qp, kp, vp = (torch.randn_like(x) * 50 for x in (q, k, v))  # garbage in the pads must not leak
    for b, n in enumerate(lens):
        mask[b, 40 - n:] = True
        qp[b, 40 - n:], kp[b, 40 - n:], vp[b, 40 - n:] = q[b, :n], k[b, :n], v[b, :n]
    for fn in (lightnet_chunk, lightnet_recurrent):
        o, st = fn(qp, kp, vp, mask=mask, output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(st.S).all()
        for b, n in enumerate(lens):
            ref, rst = lightnet_reference(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
            assert_close("o", ref[0], o[b, 40 - n:], atol=1e-5)
            assert_close("z", rst.z[0], st.z[b], atol=1e-5)
            assert (o[b, :40 - n] == 0).all()


def test_leading_pads_have_no_nan_in_grads():
    q, k, v, _ = make(30)
    mask = torch.ones(B, 30, dtype=torch.bool)
    mask[1, :10] = False
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, st = lightnet_chunk(*leaves, mask=mask, output_final_state=True)
    (o.sum() + st.S.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert (leaves[1].grad[1, :10] == 0).all() and (leaves[2].grad[1, :10] == 0).all()


def test_right_padding_equals_unpadded_noncausal_and_fully_padded_row_is_zero():
    q, k, v, _ = make(30)
    mask = torch.zeros(B, 30, dtype=torch.bool)
    mask[0, :17] = True  # row 1 fully padded
    o, st = lightnet_global(q, k.masked_fill(~mask[..., None, None], 1e4), v, mask=mask,
                            output_final_state=True)
    ref, _ = lightnet_reference(q[:1, :17], k[:1, :17], v[:1, :17], causal=False)
    assert_close("o", ref[0], o[0, :17], atol=1e-5)
    assert (o[0, 17:] == 0).all() and (o[1] == 0).all()
    assert torch.isneginf(st.z[1]).all() and (st.S[1] == 0).all()
    oc, _ = lightnet_chunk(q, k, v, mask=mask)
    assert (oc[1] == 0).all() and torch.isfinite(oc).all()


def test_packed_equals_padded():
    lens = [5, 40, 17]
    T = max(lens)
    g = torch.Generator().manual_seed(3)
    qs = [torch.randn(n, H, K, generator=g) for n in lens]
    ks = [torch.randn(n, H, K, generator=g) for n in lens]
    vs = [torch.randn(n, H, V, generator=g) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    for causal in (True, False):
        packed, st = lightnet_attn(torch.cat(qs)[None], torch.cat(ks)[None], torch.cat(vs)[None], causal=causal,
                                   cu_seqlens=cu, output_final_state=True)
        for i in range(len(lens)):
            ref, rst = lightnet_reference(qs[i][None], ks[i][None], vs[i][None], causal=causal)
            assert_close("o", ref[0], packed[0, cu[i]:cu[i + 1]], atol=1e-5)
            assert_close("S", rst.S[0], st.S[i], atol=1e-5)
        assert T == 40


def test_causality():
    q, k, v, _ = make(40)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = lightnet_chunk(*leaves, chunk_size=16)
    o[:, 20].sum().backward()
    for x in leaves:
        assert (x.grad[:, 21:] == 0).all()
        assert x.grad[:, :21].abs().sum() > 0


@pytest.mark.parametrize(("T", "chunk"), [(1, 64), (7, 4), (33, 8), (64, 16)], ids=lambda x: str(x))
def test_prefix_logsumexp_gradcheck(T, chunk):
    """The chunked normaliser (hand-written backward) against logcumsumexp, and gradcheck in float64."""
    g = torch.Generator().manual_seed(T)
    k = (torch.randn(2, T, 3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    z0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    z, k_hat = PrefixLogSumExp.apply(k, z0, chunk)
    ref = torch.logaddexp(z0.unsqueeze(1), torch.logcumsumexp(k, 1))
    assert_close("z", ref, z, atol=1e-12)
    assert_close("k_hat", torch.exp(k - ref), k_hat, atol=1e-12)
    assert torch.autograd.gradcheck(lambda k, z0: PrefixLogSumExp.apply(k, z0, chunk), (k, z0))


def test_prefix_logsumexp_huge_logits_finite():
    """|k| up to 1e4 and an empty start (z_0 = NEG): every exponent is ≤ 0, forward and backward."""
    k = (torch.randn(1, 300, 2, 4, generator=torch.Generator().manual_seed(0)) * 1e4).requires_grad_()
    z, k_hat = PrefixLogSumExp.apply(k, torch.full((1, 2, 4), chunk_gated.NEG), 16)
    ref = torch.logcumsumexp(k.double(), 1)
    assert_close("z", ref, z, ratio=1e-6)
    (z.sum() + k_hat.sum()).backward()
    assert torch.isfinite(k.grad).all()


def test_grouped_chunks_match_reference(monkeypatch):
    """One chunk per group in the chunk engine (state and its gradient carried across groups): LRPE features,
    an initial state and left padding, against the float64 sums."""
    monkeypatch.setattr(chunk_gated, "GROUP_ELEMENTS", 1)
    T = 70
    q, k, v, s0 = make(T, R=2, state=True)
    angles = md_lrpe_angles(torch.arange(T, dtype=torch.float32)[:, None], lrpe_theta(K, H), K)[None]
    feats = lrpe_key_features(angles)
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=True, initial_state=s, key_features=feats),
            lambda q, k, v, s: lightnet_chunk(q, k, v, initial_state=s, output_final_state=True, key_features=feats,
                                              chunk_size=16),
            q, k, v, s0)
    q, k, v, _ = make(T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :25] = False
    o, _ = lightnet_chunk(q, k, v, mask=mask, chunk_size=16)
    ref, _ = lightnet_reference(q[1:, 25:], k[1:, 25:], v[1:, 25:], causal=True)
    assert_close("left-padded row", ref[0], o[1, 25:], atol=1e-5)


def test_blocked_global_matches_reference(monkeypatch):
    """Many token blocks in the non-causal form (the state, the normaliser and their gradients gathered across
    blocks): LRPE features, an initial state and right padding, against the float64 sums."""
    monkeypatch.setattr(lightnet_ops, "GLOBAL_BLOCK_ELEMENTS", 1)  # one token per block
    T = 37
    q, k, v, s0 = make(T, R=2, state=True)
    angles = md_lrpe_angles(torch.arange(T, dtype=torch.float32)[:, None], lrpe_theta(K, H), K)[None]
    feats = lrpe_key_features(angles)
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=False, initial_state=s, key_features=feats),
            lambda q, k, v, s: lightnet_global(q, k, v, initial_state=s, output_final_state=True, key_features=feats),
            q, k, v, s0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 20:] = False
    q, k, v, _ = make(T)
    o, _ = lightnet_global(q, k, v, mask=mask, scale=0.5)
    ref, _ = lightnet_reference(q[1:, :20], k[1:, :20], v[1:, :20], causal=False, scale=0.5)
    assert_close("right-padded row", ref[0], o[1, :20], atol=1e-5)
    assert (o[1, 20:] == 0).all()


def test_key_feature_gradients_match_reference():
    """The LRPE features are inputs too (e.g. learned angles): their gradients, global and chunked."""
    T = 29
    q, k, v, _ = make(T, R=2)
    angles = md_lrpe_angles(torch.arange(T, dtype=torch.float32)[:, None], lrpe_theta(K, H), K)[None]
    feats = lrpe_key_features(angles)
    for causal, fn in ((False, lightnet_global), (True, lightnet_chunk)):
        grads = []
        for f in (lambda c=causal, **a: lightnet_reference(causal=c, **a), fn):
            x = feats.detach().clone().requires_grad_()
            o, _ = f(q=q, k=k, v=v, key_features=x)
            (o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum().backward()
            grads.append(x.grad)
        assert_close(f"d features (causal={causal})", grads[0], grads[1], ratio=2e-5, atol=2e-5)


def test_global_with_values_as_wide_as_the_key_copies():
    """V = R·K (the usual head layout) must not confuse the sums over key copies with the sums over values."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, 11, H, K, generator=g) for _ in range(3))
    s0 = LightNetState(torch.randn(B, H, K, K, generator=g), torch.randn(B, H, K, generator=g))
    compare(lambda q, k, v, s: lightnet_reference(q, k, v, causal=False, initial_state=s),
            lambda q, k, v, s: lightnet_global(q, k, v, initial_state=s, output_final_state=True), q, k, v, s0)
