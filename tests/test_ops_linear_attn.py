"""Kernelized linear attention (`polyattn.ops.linear_attn`): chunked, recurrent and global forms against the
float64 reference, forward and backward, for every feature map; state continuation and padding."""

import pytest
import torch

from polyattn.ops.linear_attn import (
    FeatureMap,
    feature_map_fn,
    linear_attn,
    linear_attn_recurrent,
    linear_attn_reference,
    orthogonal_gaussian,
)
from polyattn.testing import assert_close

B, T, H, D = 2, 37, 3, 8


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) * 0.5 for _ in range(3))
    return q, k, v


def phi_of(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    projection = None
    if kind is FeatureMap.FAVOR:
        projection = orthogonal_gaussian(16, D, generator=g)
    elif kind is FeatureMap.HEDGEHOG:
        projection = torch.randn(H, D, 6, generator=g) * 0.3
    return feature_map_fn(kind, projection=projection, max_len=64)


POS = torch.arange(T)[None].expand(B, T)


@pytest.mark.parametrize("kind", list(FeatureMap))
@pytest.mark.parametrize("causal", [True, False])
def test_fast_form_equals_the_float64_reference_forward_and_backward(kind, causal):
    phi = phi_of(kind)
    q, k, v = (t.requires_grad_() for t in inputs())
    o = linear_attn(phi(q, POS), phi(k, POS), v, causal=causal, chunk_size=8)[0]
    ref = linear_attn_reference(phi(q, POS), phi(k, POS), v, causal=causal)
    assert_close(f"{kind.value} forward", ref, o, ratio=1e-5, atol=1e-6)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    for name, a, b in zip("qkv", ref_grads, grads):
        assert_close(f"{kind.value} d{name}", a, b, ratio=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(FeatureMap))
def test_recurrent_step_and_state_continuation_equal_the_chunked_form(kind):
    phi = phi_of(kind)
    q, k, v = inputs()
    fq, fk = phi(q, POS), phi(k, POS)
    full, _ = linear_attn(fq, fk, v, causal=True, chunk_size=16)
    rec, _ = linear_attn_recurrent(fq, fk, v)
    assert_close("recurrent", full, rec, ratio=1e-5, atol=1e-6)
    a, state = linear_attn(fq[:, :20], fk[:, :20], v[:, :20], causal=True, output_final_state=True, chunk_size=8)
    b, _ = linear_attn_recurrent(fq[:, 20:], fk[:, 20:], v[:, 20:], initial_state=state)
    assert_close("continued", full, torch.cat([a, b], 1), ratio=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_add_nothing_and_padded_outputs_are_zero(causal):
    phi = phi_of(FeatureMap.ELU)
    q, k, v = inputs()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 25:] = False
    o, _ = linear_attn(phi(q, None), phi(k, None), v, causal=causal, mask=mask)
    ref, _ = linear_attn(phi(q[1:, :25], None), phi(k[1:, :25], None), v[1:, :25], causal=causal)
    assert_close("padded row", ref[0], o[1, :25], atol=1e-6)
    assert (o[1, 25:] == 0).all()
    assert_close("reference", linear_attn_reference(phi(q, None), phi(k, None), v, causal=causal, mask=mask), o,
                 ratio=1e-5, atol=1e-6)


def test_feature_maps_are_non_negative_and_favor_approximates_the_softmax_kernel():
    q, k, _ = inputs()
    for kind in FeatureMap:
        assert (phi_of(kind)(q, POS) >= 0).all(), kind
    # E[φ(q)·φ(k)] = exp(q·k) for FAVOR+; with many features the estimate is close (arXiv 2009.14794, Lemma 1)
    proj = orthogonal_gaussian(4096, D, generator=torch.Generator().manual_seed(3))
    phi = feature_map_fn(FeatureMap.FAVOR, projection=proj)
    qs, ks = q[:1, :4] * 0.5, k[:1, :4] * 0.5
    est = torch.einsum("bthf,bshf->bhts", phi(qs, None), phi(ks, None))
    exact = torch.einsum("bthd,bshd->bhts", qs, ks).exp()
    assert ((est - exact).abs() / exact).max() < 0.1


def test_cosformer_reweighting_is_the_cosine_of_the_distance():
    x = torch.rand(1, 5, 1, 4)
    phi = feature_map_fn(FeatureMap.COSFORMER, max_len=10)
    pos = torch.arange(5)[None]
    kern = torch.einsum("bthf,bshf->bts", phi(x, pos), phi(x, pos))[0]
    base = x[0, :, 0] @ x[0, :, 0].T
    dist = pos[0][:, None] - pos[0][None]
    assert_close("cosformer", base * torch.cos(torch.pi * dist / 20), kern, atol=1e-6)
