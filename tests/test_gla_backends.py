"""The kernel-backend seam of causal LightNet (polyattn.ops.gla_backends): LightNet mapped onto a gated-linear-
attention kernel equals the reference, forward and backward, with padding, LRPE features and the final state.

A plain recurrent GLA loop is registered as a backend so the mapping is checked on any machine; the real external
kernel (flash-linear-attention, CUDA only) is checked the same way where it can run.
"""

import importlib.util

import pytest
import torch

import polyattn
from polyattn.ops.gla_backends import get_backend, register_backend
from polyattn.ops.lightnet import lightnet_attn, lightnet_reference


def recurrent_gla(q, k, v, g, initial_state):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t, one token at a time in float32."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for t in range(T):
        S = S * g[:, t].float().exp()[..., None] + k[:, t].float()[..., None] * v[:, t].float()[:, :, None]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(outs, 1), S


register_backend("test-loop", recurrent_gla)


def _qkv(B=2, T=23, H=2, K=4, R=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, R * K, generator=g, dtype=torch.float64, requires_grad=True)
    k = (3 * torch.randn(B, T, H, K, generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.randn(B, T, H, 5, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("with_features", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_lightnet_on_a_gla_backend_equals_the_reference(with_features, padded):
    R = 2 if with_features else 1
    q, k, v = _qkv(R=R)
    features = torch.rand(1, 23, 2, 8 if with_features else 4, dtype=torch.float64) if with_features else None
    mask = None
    if padded:
        mask = torch.ones(2, 23, dtype=torch.bool)
        mask[0, :5] = False  # left padding
        mask[1, -3:] = False  # right padding
    kw = dict(causal=True, mask=mask, key_features=features, scale=0.7)
    out, state = lightnet_attn(q.float(), k.float(), v.float(), backend="test-loop", output_final_state=True, **kw)
    ref, ref_state = lightnet_reference(q, k, v, **kw)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.S.double(), ref_state.S, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.z.double(), ref_state.z, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.double().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_a_model_runs_its_causal_core_on_the_chosen_backend():
    torch.manual_seed(0)
    default = polyattn.create_model("lightnet_lm_nano", dim=32, depth=2, num_heads=2, vocab_size=50).eval()
    torch.manual_seed(0)
    looped = polyattn.create_model("lightnet_lm_nano", dim=32, depth=2, num_heads=2, vocab_size=50,
                                   kernel_backend="test-loop").eval()
    x = torch.randint(0, 50, (2, 30))
    torch.testing.assert_close(looped(x), default(x), atol=1e-5, rtol=1e-4)


def test_the_external_backend_says_why_it_cannot_run_here():
    with pytest.raises(ValueError, match="CUDA tensors only"):
        get_backend("fla", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown gated-linear-attention backend 'triton'"):
        get_backend("triton", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
                    reason="flash-linear-attention runs on CUDA only and is not installed")
def test_flash_linear_attention_backend_equals_the_reference_on_cuda():
    q, k, v = _qkv(T=200, K=16)
    args = [x.detach().float().cuda().requires_grad_() for x in (q, k, v)]
    out, _ = lightnet_attn(*args, causal=True, backend="fla")
    ref, _ = lightnet_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-3, rtol=1e-3)
    grads = torch.autograd.grad(out.sum(), args)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-3, rtol=1e-2)
