"""Softmax attention: fast path vs float64 reference, and every mask operator against its definition."""

import pytest
import torch
import torch.nn.functional as F

from polyattn.ops import attention as attention_module
from polyattn.ops.attention import MaskMode, attention, attention_ref, causal_mask, padding_to_attn_mask
from polyattn.testing import assert_close, relative_rmse

BID, CAUSAL, ILLAMA, SOFT = MaskMode.BIDIRECTIONAL, MaskMode.CAUSAL, MaskMode.ILLAMA_SOFT, MaskMode.SOFT_CAUSAL

MODES = [(BID, 0.0), (CAUSAL, 0.0), (ILLAMA, 0.0), (ILLAMA, 0.3), (SOFT, 0.0), (SOFT, 0.3)]
MODE_IDS = [f"{m.value}-a{a}" for m, a in MODES]
# (T, S, H, Hkv): self-attention at lengths 1, 7, 63; cross-attention with fewer and with more queries than keys.
SHAPES = [(1, 1, 4, 4), (7, 7, 4, 2), (63, 63, 4, 1), (5, 12, 4, 2), (12, 5, 2, 2)]
SHAPE_IDS = [f"T{t}-S{s}-H{h}-Hkv{g}" for t, s, h, g in SHAPES]


def make_qkv(B, T, S, H, Hkv, D=8, Dv=6, dtype=torch.float32, seed=42):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, S, Hkv, Dv, generator=g).to(dtype).requires_grad_()
    return q, k, v


def make_mask(kind, B, T, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "padding":
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[-1, S - min(3, S - 1):] = False  # the last row loses up to 3 trailing keys
        return padding_to_attn_mask(kpm)
    return torch.rand(B, 1, T, S, generator=g) > 0.3  # random, may leave some rows with no key


def run(fn, q, k, v, do, **kw):
    """Output and input gradients for the upstream gradient `do`."""
    for t in (q, k, v):
        t.grad = None
    o = fn(q, k, v, **kw)
    (o.float() * do).sum().backward()
    return o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def weights(q, k, **kw):
    """The attention weights `[B, T, H, S]`, read out by attending to one-hot values."""
    B, S, Hkv = k.shape[:3]
    eye = torch.eye(S, dtype=q.dtype).expand(B, Hkv, S, S).permute(0, 2, 1, 3)  # (B, S, Hkv, S)
    return attention(q, k, eye, **kw)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "random"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mode,a", MODES, ids=MODE_IDS)
def test_matches_reference_fp32(mode, a, shape, mask_kind, backend):
    T, S, H, Hkv = shape
    q, k, v = make_qkv(2, T, S, H, Hkv)
    mask = make_mask(mask_kind, 2, T, S)
    do = torch.randn(2, T, H, v.shape[-1], generator=torch.Generator().manual_seed(1))
    kw = dict(mask_mode=mode, soft_mask_a=a, attn_mask=mask)
    ref = run(attention_ref, q, k, v, do, **kw)
    out = run(attention, q, k, v, do, **kw, backend=backend)
    for name, r, x in zip(("o", "dq", "dk", "dv"), ref, out):
        assert_close(name, r, x, ratio=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("shape", [(63, 63, 4, 2), (7, 20, 4, 1)], ids=["self-T63", "cross-T7-S20"])
@pytest.mark.parametrize("mode,a", MODES, ids=MODE_IDS)
def test_matches_reference_bf16(mode, a, shape, backend):
    T, S, H, Hkv = shape
    q, k, v = make_qkv(2, T, S, H, Hkv, dtype=torch.bfloat16)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    mask = make_mask("padding", 2, T, S)
    do = torch.randn(2, T, H, v.shape[-1], generator=torch.Generator().manual_seed(1))
    kw = dict(mask_mode=mode, soft_mask_a=a, attn_mask=mask)
    ref = run(attention_ref, q32, k32, v32, do, **kw)
    out = run(attention, q, k, v, do, **kw, backend=backend)
    assert out[0].dtype == torch.bfloat16
    for name, r, x in zip(("o", "dq", "dk", "dv"), ref, out):
        assert_close(name, r, x, ratio=1e-2, atol=0.0)


def test_auto_backend_picks_explicit_only_where_it_is_faster():
    """Explicit for short bfloat16 attention where the CPU computes bfloat16 natively (tests/test_hardware.py
    checks the other case); SDPA for long sequences, float32, and always where the mask needs it."""
    from polyattn.hardware import native_bf16

    pick = attention_module._pick_backend
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    short = attention_module.Backend.EXPLICIT if native_bf16("cpu") else attention_module.Backend.SDPA
    assert pick(attention_module.Backend.AUTO, BID, bf16, 65) is short
    assert pick(attention_module.Backend.AUTO, BID, bf16, 4096) is attention_module.Backend.SDPA
    assert pick(attention_module.Backend.AUTO, BID, bf16.float(), 65) is attention_module.Backend.SDPA
    assert pick(attention_module.Backend.SDPA, ILLAMA, bf16, 65) is attention_module.Backend.EXPLICIT


def test_explicit_path_softmax_in_fp32():
    """A bf16 softmax would round the weights to ~3 digits; the explicit path must do better than that."""
    q, k, _ = make_qkv(1, 63, 63, 2, 2, dtype=torch.bfloat16)
    q32, k32 = q.detach().float(), k.detach().float()
    eye = torch.eye(63).expand(1, 2, 63, 63).permute(0, 2, 1, 3)
    w_ref = attention_ref(q32, k32, eye, mask_mode=ILLAMA, soft_mask_a=0.5)
    w_bf16 = attention(q.detach(), k.detach(), eye.bfloat16(), mask_mode=ILLAMA, soft_mask_a=0.5)
    assert relative_rmse(w_ref, w_bf16) < 5e-3


# --- each mask operator against its definition ---


def test_causal_equals_sdpa_is_causal():
    q, k, v = make_qkv(2, 7, 7, 4, 4)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    assert_close("o", expected, attention(q, k, v, mask_mode="causal"), ratio=1e-6, atol=1e-6)
    explicit = attention(q, k, v, attn_mask=causal_mask(7, 7))
    assert_close("o explicit mask", expected, explicit, ratio=1e-6, atol=1e-6)


@pytest.mark.parametrize("u", [1, 4, 6])
def test_causal_perturbing_a_token_leaves_earlier_outputs_unchanged(u):
    q, k, v = make_qkv(2, 7, 7, 4, 2)
    o = attention(q, k, v, mask_mode=CAUSAL)
    bumped = [t.detach().clone() for t in (q, k, v)]
    for t in bumped:
        t[:, u:] += torch.randn_like(t[:, u:])
    o2 = attention(*bumped, mask_mode=CAUSAL)
    assert torch.equal(o[:, :u], o2[:, :u])
    assert not torch.allclose(o[:, u:], o2[:, u:])
    (o[:, :u] * torch.randn_like(o[:, :u])).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad[:, u:].abs().max() == 0, f"gradient reaches {name} at positions >= {u}"
    assert v.grad[:, :u].abs().max() > 0


def test_causal_is_bottom_right_aligned_for_cached_queries():
    """The last T queries against all S keys equal the last T rows of the square causal attention."""
    q, k, v = make_qkv(2, 9, 9, 4, 2)
    full = attention(q, k, v, mask_mode=CAUSAL)
    for T in (1, 3):
        tail = attention(q[:, -T:], k, v, mask_mode=CAUSAL)
        assert_close(f"T={T}", full[:, -T:], tail, ratio=1e-6, atol=1e-6)
        tail = attention(q[:, -T:], k, v, mask_mode=SOFT, soft_mask_a=0.0)
        assert_close(f"soft_causal T={T}", full[:, -T:], tail, ratio=1e-6, atol=1e-6)
    assert torch.equal(causal_mask(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_illama_soft_a1_equals_bidirectional():
    q, k, v = make_qkv(2, 7, 7, 4, 2)
    assert_close("o", attention(q, k, v), attention(q, k, v, mask_mode=ILLAMA, soft_mask_a=1.0), 1e-6, 1e-6)


def test_illama_soft_a0_rows_do_not_sum_to_one():
    q, k, _ = make_qkv(2, 7, 7, 4, 4)
    sums = weights(q.detach(), k.detach(), mask_mode=ILLAMA, soft_mask_a=0.0).sum(-1)  # (B, T, H)
    assert (sums[:, :-1] < 1 - 1e-3).all()
    assert_close("last row", torch.ones_like(sums[:, -1]), sums[:, -1], ratio=1e-6, atol=1e-6)


def test_illama_soft_leaks_future_keys_into_token_0():
    """Documents the released iLLaMA semantics: at a = 0 token 0 still depends on the last key."""
    q, k, v = make_qkv(2, 7, 7, 4, 2)
    q, k, v = q.detach(), k.detach(), v.detach()
    k2 = k.clone()
    k2[:, -1] += 2.0 * torch.randn_like(k2[:, -1])
    leak = (attention(q, k, v, mask_mode=ILLAMA) - attention(q, k2, v, mask_mode=ILLAMA))[:, 0].abs().max()
    assert leak > 1e-3, "illama_soft should leak future keys into earlier outputs"
    causal = (attention(q, k, v, mask_mode=CAUSAL) - attention(q, k2, v, mask_mode=CAUSAL))[:, 0].abs().max()
    assert causal == 0


@pytest.mark.parametrize("a", [0.25, 0.7])
def test_illama_soft_future_weights_are_a_times_bidirectional(a):
    q, k, _ = make_qkv(2, 7, 7, 4, 2)
    w_bid = weights(q.detach(), k.detach())
    w_soft = weights(q.detach(), k.detach(), mask_mode=ILLAMA, soft_mask_a=a)
    future = ~causal_mask(7, 7)[None, :, None, :].expand_as(w_bid)
    assert_close("future", a * w_bid[future], w_soft[future], ratio=1e-6, atol=1e-7)
    assert_close("past", w_bid[~future], w_soft[~future], ratio=1e-6, atol=1e-7)


def test_soft_causal_endpoints_and_renormalisation():
    q, k, v = make_qkv(2, 7, 7, 4, 2)
    assert_close("a=0", attention(q, k, v, mask_mode=CAUSAL), attention(q, k, v, mask_mode=SOFT), 1e-6, 1e-6)
    assert_close("a=1", attention(q, k, v), attention(q, k, v, mask_mode=SOFT, soft_mask_a=1.0), 1e-6, 1e-6)
    a = torch.tensor(0.4)
    w_bid = weights(q.detach(), k.detach())
    gain = a + (1 - a) * causal_mask(7, 7).float()[None, :, None, :]
    expected = w_bid * gain / (w_bid * gain).sum(-1, keepdim=True)
    assert_close("a=0.4", expected, weights(q.detach(), k.detach(), mask_mode=SOFT, soft_mask_a=a), 1e-6, 1e-7)


@pytest.mark.parametrize("sdpa_gqa", [True, False], ids=["sdpa-gqa", "repeat-fallback"])
@pytest.mark.parametrize("mode,a", MODES, ids=MODE_IDS)
def test_gqa_equals_repeated_kv_heads(mode, a, sdpa_gqa, monkeypatch):
    # the fallback serves torch < 2.5, whose SDPA cannot share kv heads
    monkeypatch.setattr(attention_module, "_SDPA_HAS_GQA", sdpa_gqa and attention_module._SDPA_HAS_GQA)
    q, k, v = make_qkv(2, 7, 9, 6, 2)
    mask = make_mask("random", 2, 7, 9)
    kw = dict(mask_mode=mode, soft_mask_a=a, attn_mask=mask)
    expected = attention(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), **kw)
    assert_close("o", expected, attention(q, k, v, **kw), ratio=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,a", MODES, ids=MODE_IDS)
def test_right_padded_batch_equals_unpadded_rows(mode, a):
    lengths = [7, 4, 1]
    q, k, v = make_qkv(3, 7, 7, 4, 2)
    kpm = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    do = torch.randn(3, 7, 4, v.shape[-1])
    do = do * kpm[:, :, None, None]  # only real tokens' outputs are used
    kw = dict(mask_mode=mode, soft_mask_a=a)
    o, dq, dk, dv = run(attention, q, k, v, do, attn_mask=padding_to_attn_mask(kpm), **kw)
    for b, n in enumerate(lengths):
        qb, kb, vb = (t.detach()[b:b + 1, :n].clone().requires_grad_() for t in (q, k, v))
        ob, dqb, dkb, dvb = run(attention, qb, kb, vb, do[b:b + 1, :n], **kw)
        assert_close(f"o row {b}", ob[0], o[b, :n], ratio=1e-6, atol=1e-6)
        for name, r, x in (("dq", dqb, dq), ("dk", dkb, dk), ("dv", dvb, dv)):
            assert_close(f"{name} row {b}", r[0], x[b, :n], ratio=1e-6, atol=1e-6)
        if n < 7:  # padded keys get no gradient
            assert dk[b, n:].abs().max() == 0 and dv[b, n:].abs().max() == 0


@pytest.mark.parametrize("mode,a", MODES, ids=MODE_IDS)
def test_rows_with_no_visible_key_are_zero(mode, a):
    q, k, v = make_qkv(2, 5, 6, 4, 2)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, :, 1] = False  # query 1 of row 0 sees nothing
    mask[1, :, :, :] = False  # row 1 sees nothing at all
    do = torch.randn(2, 5, 4, v.shape[-1])
    o, dq, dk, dv = run(attention, q, k, v, do, mask_mode=mode, soft_mask_a=a, attn_mask=mask)
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert o[0, 1].abs().max() == 0 and o[1].abs().max() == 0
    assert dq[0, 1].abs().max() == 0 and dq[1].abs().max() == 0
    assert dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert o[0, 0].abs().max() > 0


@pytest.mark.parametrize("mode", [CAUSAL, SOFT, ILLAMA])
def test_causal_queries_before_every_key_are_zero(mode):
    """With more queries than keys, bottom-right alignment leaves the first T − S queries without keys."""
    q, k, v = make_qkv(1, 6, 4, 2, 2)
    do = torch.randn(1, 6, 2, v.shape[-1])
    o, dq, dk, dv = run(attention, q, k, v, do, mask_mode=mode)
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert o[:, :2].abs().max() == 0 and dq[:, :2].abs().max() == 0
    assert o[:, 2:].abs().max() > 0


def test_dropout_changes_weights_and_stays_finite():
    q, k, v = make_qkv(2, 7, 7, 4, 2)
    for mode in (BID, ILLAMA):
        torch.manual_seed(0)
        o = attention(q, k, v, mask_mode=mode, dropout_p=0.5)
        assert torch.isfinite(o).all()
        assert not torch.allclose(o, attention(q, k, v, mask_mode=mode))
    with pytest.raises(ValueError, match="dropout"):
        attention_ref(q, k, v, dropout_p=0.1)


def test_argument_validation():
    q, k, v = make_qkv(1, 3, 3, 3, 2)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v = make_qkv(1, 3, 3, 4, 2)
    with pytest.raises(ValueError, match="boolean"):
        attention(q, k, v, attn_mask=torch.ones(3, 3))
    with pytest.raises(ValueError):
        attention(q, k, v, mask_mode="casual")
    with pytest.raises(ValueError, match="incompatible"):
        attention(q, k[:, :2], v)
    assert padding_to_attn_mask(torch.ones(2, 5, dtype=torch.bool)).shape == (2, 1, 1, 5)
