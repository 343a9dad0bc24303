"""The Attention layer: projections and heads, cached decoding, cross-attention, errors, export."""

import pytest
import torch

from polyattn.errors import UserError
from polyattn.layers.attention import Attention, KVCache
from polyattn.layers.rope import RotaryEmbedding
from polyattn.ops.attention import MaskMode, attention_ref, padding_to_attn_mask
from polyattn.ops.sequence import real_positions
from polyattn.testing import assert_close


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dim,heads", [(64, 4), (192, 3)])
def test_parameter_count_and_init(dim, heads):
    torch.manual_seed(0)
    attn = Attention(dim, heads, qkv_bias=True, proj_bias=True)
    assert sum(p.numel() for p in attn.parameters()) == 4 * dim * dim + 4 * dim
    assert sum(p.numel() for p in Attention(dim, heads).parameters()) == 4 * dim * dim + dim
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        proj = getattr(attn, name)
        assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
        assert abs(proj.weight.std().item() - 0.02) < 0.002


def test_gqa_and_head_dim_shapes():
    attn = Attention(48, 6, num_kv_heads=2, head_dim=16, context_dim=20)
    assert attn.q_proj.weight.shape == (96, 48) and attn.k_proj.weight.shape == (32, 20)
    assert attn.o_proj.weight.shape == (48, 96)
    y, cache = attn(randn(2, 5, 48), context=randn(2, 7, 20))
    assert y.shape == (2, 5, 48) and cache is None
    with pytest.raises(ValueError, match="multiple"):
        Attention(48, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        Attention(50, 6)


def test_mask_mode_accepts_strings_and_rejects_unknown_values():
    assert Attention(16, 2, mask_mode="illama_soft").mask_mode is MaskMode.ILLAMA_SOFT
    assert Attention(16, 2, mask_mode=MaskMode.CAUSAL).mask_mode is MaskMode.CAUSAL
    with pytest.raises(UserError, match="Did you mean 'causal'"):
        Attention(16, 2, mask_mode="casual")
    with pytest.raises(ValueError):
        Attention(16, 2, mask_mode="leaky")


@pytest.mark.parametrize("mode", list(MaskMode))
def test_forward_equals_explicit_projection_and_reference(mode):
    """The layer is o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x)) with heads split in order."""
    torch.manual_seed(0)
    attn = Attention(32, 4, num_kv_heads=2, qkv_bias=True, mask_mode=mode).eval()
    x = randn(2, 7, 32)
    kpm = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    rot = RotaryEmbedding(8)(torch.arange(7))
    y, _ = attn(x, rope=rot, soft_mask_a=0.3, key_padding_mask=kpm)
    q = rot.apply(attn.q_proj(x).reshape(2, 7, 4, 8))
    k = rot.apply(attn.k_proj(x).reshape(2, 7, 2, 8))
    v = attn.v_proj(x).reshape(2, 7, 2, 8)
    o = attention_ref(q, k, v, mask_mode=mode, soft_mask_a=0.3, attn_mask=padding_to_attn_mask(kpm))
    assert_close("y", attn.o_proj(o.reshape(2, 7, 32)), y, ratio=1e-5, atol=1e-6)


def make_left_padded(prompt_lengths, num_new, dim, seed=1):
    """Real token sequences per row, and the left-padded batch holding them (pads are random, not zero)."""
    P = max(prompt_lengths)
    x = randn(len(prompt_lengths), P + num_new, dim, seed=seed)
    kpm = torch.arange(P)[None, :] >= (P - torch.tensor(prompt_lengths))[:, None]  # (B, P)
    kpm = torch.cat([kpm, torch.ones(len(prompt_lengths), num_new, dtype=torch.bool)], dim=1)
    rows = [x[b, kpm[b]] for b in range(len(prompt_lengths))]
    return x, kpm, rows


@pytest.mark.parametrize("mode,a", [(MaskMode.CAUSAL, 0.0), (MaskMode.SOFT_CAUSAL, 0.0)], ids=["causal", "soft0"])
def test_cached_decode_with_left_padding_equals_full_forward(mode, a):
    torch.manual_seed(0)
    dim, lengths, P, num_new = 32, [5, 3, 1], 5, 5
    attn = Attention(dim, 4, num_kv_heads=2, qkv_bias=True, mask_mode=mode).eval()
    rope = RotaryEmbedding(8)
    x, kpm, rows = make_left_padded(lengths, num_new, dim)

    # prefill the prompts, then a chunk of 2 tokens, then token by token
    y, cache = attn(x[:, :P], rope=rope(real_positions(kpm[:, :P])), key_padding_mask=kpm[:, :P],
                    soft_mask_a=a, use_cache=True)
    outs = [y]
    for start, stop in [(P, P + 2)] + [(t, t + 1) for t in range(P + 2, P + num_new)]:
        y, cache = attn(x[:, start:stop], rope=rope(cache.next_positions(stop - start)), cache=cache,
                        soft_mask_a=a)
        outs.append(y)
    decoded = torch.cat(outs, dim=1)
    assert cache.offset == P + num_new and cache.k.shape == (3, P + num_new, 2, 8)

    for b, row in enumerate(rows):
        expected, _ = attn(row[None], rope=rope(torch.arange(len(row))), soft_mask_a=a)
        assert_close(f"row {b}", expected[0], decoded[b, kpm[b]], ratio=1e-5, atol=1e-5)
    # the padded batch in one pass agrees as well
    full, _ = attn(x, rope=rope(real_positions(kpm)), key_padding_mask=kpm, soft_mask_a=a)
    assert_close("padded batch", full[kpm], decoded[kpm], ratio=1e-5, atol=1e-5)


def test_cache_requires_decodable_mask_mode():
    attn = Attention(16, 2, mask_mode="illama_soft")
    x = randn(1, 3, 16)
    with pytest.raises(UserError, match="illama_soft"):
        attn(x, use_cache=True)
    with pytest.raises(UserError, match="illama_soft"):
        attn(x, cache=KVCache.empty(1, 2, 8))
    attn(x, soft_mask_a=0.5)  # without a cache it runs


def test_cross_attention_with_cached_context_equals_recomputation():
    torch.manual_seed(0)
    attn = Attention(32, 4, num_kv_heads=2, context_dim=24, qkv_bias=True).eval()
    ctx = randn(2, 9, 24, seed=2)
    ctx_kpm = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    x1, x2 = randn(2, 4, 32, seed=3), randn(2, 1, 32, seed=4)

    y1, ctx_cache = attn(x1, context=ctx, key_padding_mask=ctx_kpm, use_cache=True)
    assert isinstance(ctx_cache, KVCache) and ctx_cache.k.shape == (2, 9, 2, 8) and ctx_cache.offset == 9
    y2, same = attn(x2, context=ctx_cache, use_cache=True)
    assert same is ctx_cache
    assert_close("step 2", attn(x2, context=ctx, key_padding_mask=ctx_kpm)[0], y2, ratio=1e-6, atol=1e-7)
    encoded = attn.encode_context(ctx, key_padding_mask=ctx_kpm)
    assert_close("encode_context", y1, attn(x1, context=encoded)[0], ratio=1e-6, atol=1e-7)
    # the padded context row equals attending to its real part only
    y_row, _ = attn(x1[1:], context=ctx[1:, :6])
    assert_close("padding", y_row, y1[1:], ratio=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context="):
        attn(x1, context=ctx, cache=ctx_cache)
    with pytest.raises(ValueError, match="cached context"):
        attn(x1, context=ctx_cache, key_padding_mask=ctx_kpm)


def test_cross_attention_rope_only_when_passed():
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x, ctx = randn(1, 3, 16), randn(1, 5, 16, seed=1)
    rope = RotaryEmbedding(8)
    plain, _ = attn(x, context=ctx)
    rotated, _ = attn(x, context=ctx, rope=rope(torch.arange(2, 5)), context_rope=rope(torch.arange(5)))
    assert not torch.allclose(plain, rotated)
    # Perceiver AR: queries are the last 3 of the 5 context positions; with rope on both sides (and the
    # causal mask bottom-right aligned) this equals the last 3 rows of causal self-attention.
    causal = Attention(16, 2, mask_mode="causal").eval()
    causal.load_state_dict(attn.state_dict())
    full, _ = causal(ctx, rope=rope(torch.arange(5)))
    tail, _ = causal(ctx[:, 2:], context=ctx, rope=rope(torch.arange(2, 5)), context_rope=rope(torch.arange(5)))
    assert_close("perceiver-ar tail", full[:, 2:], tail, ratio=1e-6, atol=1e-6)


def test_kv_cache_append_is_functional():
    empty = KVCache.empty(2, 3, 4, device="cpu", dtype=torch.float32)
    a = empty.append(randn(2, 2, 3, 4), randn(2, 2, 3, 4))
    assert empty.k.shape[1] == 0 and empty.offset == 0
    assert a.offset == 2 and a.key_padding_mask is None
    assert a.next_positions(3).tolist() == [2, 3, 4]
    b = a.append(randn(2, 1, 3, 4), randn(2, 1, 3, 4), torch.tensor([[False], [True]]))
    assert a.k.shape[1] == 2 and b.k.shape[1] == 3 and b.offset == 3
    assert b.key_padding_mask.tolist() == [[True, True, False], [True, True, True]]
    assert b.next_positions(1).tolist() == [[2], [3]]
    assert torch.equal(b.k[:, :2], a.k)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = Attention(16, 2, attn_drop=0.5, proj_drop=0.5)
    x = randn(2, 5, 16)
    attn.eval()
    assert torch.equal(attn(x)[0], attn(x)[0])
    attn.train()
    assert not torch.equal(attn(x)[0], attn(x)[0])


def test_torch_export_causal_layer():
    class WithRope(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(32, 4, num_kv_heads=2, qkv_bias=True, mask_mode="causal")
            self.rope = RotaryEmbedding(8)

        def forward(self, x, key_padding_mask):
            rot = self.rope(real_positions(key_padding_mask))
            return self.attn(x, rope=rot, key_padding_mask=key_padding_mask)[0]

    torch.manual_seed(0)
    model = WithRope().eval()
    x = randn(2, 6, 32)
    kpm = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    exported = torch.export.export(model, (x, kpm))
    assert_close("exported", model(x, kpm), exported.module()(x, kpm), ratio=1e-6, atol=1e-6)
    x2, kpm2 = randn(2, 6, 32, seed=5), torch.ones(2, 6, dtype=torch.bool)
    assert_close("new inputs", model(x2, kpm2), exported.module()(x2, kpm2), ratio=1e-6, atol=1e-6)
