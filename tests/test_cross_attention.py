"""Cross-attention: the linear form against the explicit one (forward and backward), the context state's size, and
`CrossAttentionBlock` with softmax and linear attention (an encoded context reused equals recomputing it; padding
gets no weight)."""

import pytest
import torch

from polyattn.layers.attention import Attention
from polyattn.layers.cross_attention import CrossAttentionBlock, LinearCrossAttention
from polyattn.ops.linear_cross_attention import linear_context_state, linear_cross_attn, linear_cross_attn_reference


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("padded", [False, True])
def test_linear_cross_attention_equals_the_explicit_form_forward_and_backward(padded):
    B, T, S, H, D, Dv = 2, 5, 9, 3, 4, 6
    q, k, v = (randn(B, T, H, D, seed=1).requires_grad_(), randn(B, S, H, D, seed=2).requires_grad_(),
               randn(B, S, H, Dv, seed=3).requires_grad_())
    mask = torch.arange(S)[None] < torch.tensor([[S], [4]]) if padded else None
    out = linear_cross_attn(q, linear_context_state(k, v, mask))
    ref = linear_cross_attn_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)  # the state is float32
    w = randn(B, T, H, Dv, seed=4)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    if padded:  # padding keys get no weight: other values there change nothing
        v2 = torch.where(mask[:, :, None, None], v, v + 100)
        torch.testing.assert_close(linear_cross_attn(q, linear_context_state(k, v2, mask)), out)


def test_the_context_state_has_a_fixed_size_whatever_the_context_length():
    """The per-query cost is one product with a `[H, D, Dv]` state: it does not grow with the context."""
    q = randn(1, 3, 2, 4, dtype=torch.float32)
    shapes = set()
    for S in (1, 7, 500):
        state = linear_context_state(randn(1, S, 2, 4, dtype=torch.float32), randn(1, S, 2, 5, dtype=torch.float32))
        shapes.add((tuple(state.kv.shape), tuple(state.k_sum.shape)))
        assert linear_cross_attn(q, state).shape == (1, 3, 2, 5)
    assert shapes == {((1, 2, 4, 5), (1, 2, 4))}


@pytest.mark.parametrize("attn_layer", [Attention, LinearCrossAttention])
def test_cross_attention_block_reuses_an_encoded_context_and_ignores_padding(attn_layer):
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 2, context_dim=12, attn_layer=attn_layer).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    mask = torch.arange(7)[None] < torch.tensor([[7], [3]])
    direct = block(x, ctx, key_padding_mask=mask)
    encoded = block.encode_context(ctx, key_padding_mask=mask)
    for _ in range(2):  # the same encoded context serves every call (a sampler's steps, a decoder's tokens)
        torch.testing.assert_close(block(x, encoded), direct, atol=0, rtol=0)
    alone = block(x[1:], ctx[1:, :3])  # row 1's context is its first 3 tokens
    torch.testing.assert_close(direct[1:], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already holds its padding"):
        block(x, encoded, key_padding_mask=mask)


def test_linear_cross_attention_layer_equals_the_explicit_form_of_its_projections():
    torch.manual_seed(0)
    attn = LinearCrossAttention(8, 2, context_dim=6).double()
    x, ctx = randn(1, 4, 8), randn(1, 9, 6)
    out, _ = attn(x, context=ctx)
    heads = lambda t: t.unflatten(-1, (2, 4))
    ref = linear_cross_attn_reference(heads(attn.q_proj(x)), heads(attn.k_proj(ctx)), heads(attn.v_proj(ctx)))
    torch.testing.assert_close(out, attn.o_proj(ref.flatten(2)), atol=1e-6, rtol=1e-5)


# ---- the Perceiver-style latent image classifier -------------------------------------------------------------

def _vision(**kw):
    import polyattn

    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, num_latents=6, depth=2, num_heads=2)
    return polyattn.create_model("perceiver_vision_nano", **{**args, **kw}).eval()


@pytest.mark.parametrize("linear", [False, True])
def test_perceiver_vision_reads_the_image_once_into_its_latents(linear):
    model = _vision(linear_cross_attention=linear)
    assert isinstance(model.cross.attn, LinearCrossAttention if linear else Attention)
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 6, 32)  # N latents, whatever the image size
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 6, 32)
    # the image enters only through the cross-attention: the latent stack sees the patches nowhere else
    seen = []
    model.cross.register_forward_hook(lambda m, a, out: seen.append(a[1].shape))
    model(x)
    assert seen == [(2, 16, 32)]  # 16 patch tokens of width D
    # permuting the latents' order permutes nothing the head sees (mean over latents, no latent positions)
    with torch.no_grad():
        logits = model(x)
        model.latents.copy_(model.latents.flip(1))
    torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


def test_perceiver_vision_cross_attention_cost_is_latents_times_patches():
    """The cross-attention's weights are `[N, T]` per head, the latent blocks' `[N, N]`: queries and keys counted
    at each attention layer's input."""
    model = _vision()
    shapes = []
    record = lambda m, args, kw: shapes.append((args[0].shape[1], kw["context"].k.shape[1] if kw.get("context")
                                                is not None else args[0].shape[1]))
    for attn in [model.cross.attn, *(b.attn for b in model.blocks)]:
        attn.register_forward_pre_hook(record, with_kwargs=True)
    model(torch.randn(1, 3, 16, 16))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == [(6, 16), (6, 6), (6, 6), (6, 64), (6, 6), (6, 6)]  # N × T, then N × N per latent block
