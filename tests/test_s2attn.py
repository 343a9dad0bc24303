"""LongLoRA S²-Attn (arXiv 2309.12307): the mask against a loop reference, no wrap-around leakage, the roll form
flagged leaky, the group-by-group computation (and LLP's segment-by-segment one) against the mask form, and the
LlamaLM option (training-time only by default, causal, exact under padding and packing)."""

import pytest
import torch

import polyattn
from polyattn.data.text import pack_documents, pad_documents
from polyattn.ops.attention import (
    attention,
    attention_ref,
    causal_mask,
    llp_mask,
    segment_pair_attention,
    shifted_group_attention,
    shifted_group_mask,
    shifted_group_mask_at,
)
from polyattn.train.config import build_config

V = 53


def loop_reference(T: int, G: int, H: int, causal: bool) -> torch.Tensor:
    """Spec §3.2 written out: first H // 2 heads groups [kG, (k+1)G), the others groups shifted by G // 2."""
    out = torch.zeros(H, T, T, dtype=torch.bool)
    for h in range(H):
        s = G // 2 if h >= H // 2 else 0
        for t in range(T):
            for u in range(T):
                out[h, t, u] = (t + s) // G == (u + s) // G and (u <= t or not causal)
    return out


@pytest.mark.parametrize("T, G, H", [(16, 4, 2), (17, 4, 4), (23, 6, 3), (9, 8, 2), (5, 16, 2), (12, 5, 6)])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_equals_the_loop_reference(T, G, H, causal):
    assert torch.equal(shifted_group_mask(T, G, H, causal=causal), loop_reference(T, G, H, causal))


@pytest.mark.parametrize("T, G, H, Hkv", [(16, 4, 2, 2), (17, 4, 4, 2), (23, 6, 3, 3), (9, 8, 2, 1), (3, 16, 2, 2),
                                         (12, 5, 6, 3), (40, 8, 1, 1), (33, 2, 4, 4)])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_grouped_computation_equals_the_mask_form_forward_and_backward(T, G, H, Hkv, mode):
    g = torch.Generator().manual_seed(T * G + H)
    q, k, v = (torch.randn(2, T, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    mask = shifted_group_mask(T, G, H, causal=mode == "causal")
    ref = attention_ref(q, k, v, mask_mode=mode, attn_mask=mask)
    out = shifted_group_attention(q, k, v, G, mask_mode=mode)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)  # the op's softmax runs in float32
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T, m, H, Hkv", [(16, 4, 2, 2), (17, 4, 4, 2), (3, 8, 2, 1), (8, 8, 2, 2), (23, 5, 3, 3),
                                         (9, 1, 2, 2), (40, 16, 1, 1)])
def test_llp_segment_by_segment_equals_the_mask_form_forward_and_backward(T, m, H, Hkv):
    g = torch.Generator().manual_seed(T * m + H)
    q, k, v = (torch.randn(2, T, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    pos = torch.arange(T)
    ref = attention_ref(q, k, v, mask_mode="causal", attn_mask=llp_mask(pos, pos, m))
    out = segment_pair_attention(q, k, v, m)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)  # the op's softmax runs in float32
    torch.testing.assert_close(segment_pair_attention(q, k, v, m, mask_mode="bidirectional"), out)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="causal or bidirectional layer"):
        segment_pair_attention(q, k, v, m, mask_mode="illama_soft")
    with pytest.raises(ValueError, match="one sequence"):
        segment_pair_attention(q, k[:, :T - 1], v[:, :T - 1], m)
    with pytest.raises(ValueError, match="positive number"):
        segment_pair_attention(q, k, v, 0)


def test_grouped_computation_in_bfloat16_and_its_bad_calls():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 50, 4, 16, generator=g) for _ in range(3))
    ref = attention(q, k, v, mask_mode="causal", attn_mask=shifted_group_mask(50, 8, 4))
    out = shifted_group_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="causal or bidirectional"):
        shifted_group_attention(q, k, v, 8, mask_mode="illama_soft")
    with pytest.raises(ValueError, match="one sequence"):
        shifted_group_attention(q, k[:, :40], v[:, :40], 8)
    with pytest.raises(ValueError, match="at least 2"):
        shifted_group_attention(q, k, v, 1)


def test_mask_at_positions_follows_the_positions_and_broadcasts_over_the_batch():
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])  # row 0: two left pads (position 0)
    m = shifted_group_mask_at(pos, pos, 4, 2)
    assert m.shape == (2, 2, 7, 7)
    ref = loop_reference(7, 4, 2, causal=True)
    assert torch.equal(m[1], ref)
    assert torch.equal(m[0, :, 2:, 2:], ref[:, :5, :5])  # the real tokens of row 0 see what an unpadded row sees
    decode = shifted_group_mask_at(torch.tensor([5]), torch.arange(6), 4, 2)  # one query after a 5-token cache
    assert torch.equal(decode, loop_reference(6, 4, 2, causal=True)[:, 5:])


def test_no_wrap_around_and_the_shifted_half_really_differs():
    T, G, H = 24, 8, 4
    m = shifted_group_mask(T, G, H)
    t, u = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert not (m & (u > t)).any(), "a token attends to the future"
    assert not (m & ((t - u).abs() >= G)).any(), "a group reaches across the sequence ends"
    # the shifted heads' first group is only G/2 long: tokens 0..3 see each other, token 4 starts a new group
    assert m[2, 3, :4].all() and not m[2, 4, :4].any() and m[2, 11, 4:12].all()
    # unshifted heads cut at multiples of G, shifted heads at G/2 + multiples of G: the halves differ
    assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3])
    assert not torch.equal(m[0], m[2])
    assert m[0, 7, 0] and not m[2, 7, 0] and m[2, 11, 4] and not m[0, 11, 4]
    # together the halves connect neighbouring groups: token 11 (group 1) sees token 4 (group 0) through head 2
    assert (m[:2].any(0) | m[2:].any(0)).sum() > m[0].sum()


@pytest.mark.parametrize("T", [6, 8])
def test_large_groups_reduce_to_dense_attention(T):
    """G ≥ 2T puts every position of both halves in one group (G ≥ T alone leaves the shifted half a cut at G/2)."""
    assert torch.equal(shifted_group_mask(T, 2 * T, 4), causal_mask(T, T).expand(4, T, T))
    assert torch.equal(shifted_group_mask(T, 2 * T, 4, causal=False), torch.ones(4, T, T, dtype=torch.bool))
    assert not torch.equal(shifted_group_mask(T, T, 4), causal_mask(T, T).expand(4, T, T))


def roll_form(q, k, v, G):
    """The paper's pseudo-code: roll the second half of the heads by −G/2, causal attention within groups of G,
    roll back."""
    B, T, H, D = q.shape
    half = H // 2

    def shift(x, n):
        return torch.cat([x[:, :, :half], x[:, :, half:].roll(n, dims=1)], dim=2)

    q, k, v = (shift(x, -(G // 2)) for x in (q, k, v))
    grouped = lambda x: x.reshape(B, T // G, G, H, D).flatten(0, 1)  # (B·T/G, G, H, D)
    o = attention(grouped(q), grouped(k), grouped(v), mask_mode="causal", backend="explicit")
    return shift(o.reshape(B, T, H, D), G // 2)


def test_roll_form_mask_equals_the_paper_pseudo_code_and_leaks_the_future():
    torch.manual_seed(0)
    B, T, H, D, G = 2, 16, 4, 8, 4
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    mask = shifted_group_mask(T, G, H, wrap_around=True)
    o = attention(q, k, v, attn_mask=mask[None], backend="explicit")
    torch.testing.assert_close(o, roll_form(q, k, v, G))
    # known leak (LongLoRA #15, #90): tokens 0..G/2-1 of the shifted heads see the last G/2 tokens
    assert mask[H // 2:, :G // 2, T - G // 2:].all()
    v2 = v.clone()
    v2[:, -1] += 1.0
    o2 = attention(q, k, v2, attn_mask=mask[None], backend="explicit")
    assert not torch.allclose(o2[:, 0, H // 2:], o[:, 0, H // 2:]), "the roll form is expected to leak"
    # the mask form does not
    safe = shifted_group_mask(T, G, H)[None]
    torch.testing.assert_close(attention(q, k, v2, attn_mask=safe)[:, :-1], attention(q, k, v, attn_mask=safe)[:, :-1])
    with pytest.raises(ValueError, match="multiple of group_size"):
        shifted_group_mask(15, 4, 2, wrap_around=True)


def s2_lm(group_size=4, **kw):
    torch.manual_seed(0)
    return polyattn.create_model("llama_lm_nano", vocab_size=V, dim=32, depth=2, num_heads=4,
                                 s2_group_size=group_size, **kw)


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_s2_is_training_only_by_default():
    model = s2_lm()
    dense = polyattn.create_model("llama_lm_nano", vocab_size=V, dim=32, depth=2, num_heads=4)
    dense.load_state_dict(model.state_dict())
    x = tokens(2, 19)
    train_out = model.train()(x)
    assert not torch.allclose(train_out, dense.train()(x), atol=1e-4), "S² changed nothing in training"
    torch.testing.assert_close(model.eval()(x), dense.eval()(x))  # evaluation: full causal attention
    kept = s2_lm(s2_at_inference=True).eval()
    torch.testing.assert_close(kept(x), train_out)
    big = s2_lm(group_size=64).train()  # G ≥ 2T: nothing is cut
    dense.load_state_dict(big.state_dict())
    torch.testing.assert_close(big(x), dense.train()(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("s2_at_inference", [False, True])
def test_s2_model_is_causal_in_training_and_in_evaluation(s2_at_inference):
    model = s2_lm(s2_at_inference=s2_at_inference)
    x = tokens(2, 21)
    for mode in (model.train, model.eval):
        mode()
        ref = model(x)
        for j in (0, 5, 12, 20):
            y = x.clone()
            y[:, j] = (y[:, j] + 1) % V
            out = model(y)
            torch.testing.assert_close(out[:, :j], ref[:, :j], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, j:], ref[:, j:])


def test_s2_gradient_causality_on_both_head_halves():
    model = s2_lm().double().train()
    x = tokens(1, 12)
    emb = model.io.embed_tokens(x).detach().requires_grad_(True)
    model.io.embed_tokens = lambda _: emb
    logits = model(x)
    for t in range(12):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
        assert not grad[0, t + 1:].any(), f"position {t} depends on a later token"
        assert grad[0, t].any()


@pytest.mark.parametrize("side", ["left", "right"])
def test_s2_padded_rows_and_packed_documents_equal_the_rows_alone(side):
    model = s2_lm().train()
    docs = [tokens(1, n, seed=n)[0] for n in (5, 17, 11)]
    x, mask = pad_documents(docs, side=side)
    out = model(x, attention_mask=mask)
    packed, cu = pack_documents(docs)
    out_packed = model(packed, cu_seqlens=cu)[0]
    start = 0
    for i, doc in enumerate(docs):
        alone = model(doc[None])[0]
        torch.testing.assert_close(out[i][mask[i]], alone, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out_packed[start:start + len(doc)], alone, atol=2e-5, rtol=1e-4)
        start += len(doc)


def test_recipe_sets_the_group_size_on_llama_lm_nano():
    config = build_config("s2attn_lm_shakespeare", [])
    assert config.model.name == "llama_lm_nano" and config.model.args["s2_group_size"] == 64
    assert config.data.seq_len % 64 == 0
    with pytest.raises(ValueError, match="s2_group_size"):
        s2_lm(group_size=1)
