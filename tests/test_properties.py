"""Property tests (hypothesis): every op's fast forms equal its reference, and every causal op and model is
causal and decodes as it computes in full, over shapes, lengths from 0, padding, dtypes and extreme values.

Few examples per property (25, no deadline; derandomized, so CI is repeatable) keep the module within CI's
budget; `POLYATTN_EXAMPLES=300` searches longer. The example-based tests in the op and model files cover the
chosen shapes in depth.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyattn.ops.attention import attention, attention_ref
from polyattn.ops.decay_scan import decay_attn, decay_attn_recurrent, decay_attn_reference
from polyattn.ops.lightnet import LightNetState, lightnet_attn, lightnet_recurrent, lightnet_reference
from polyattn.ops.tpe import tpe_reference, tpe_scan
from polyattn.testing import assert_close

FEW = settings(max_examples=int(os.environ.get("POLYATTN_EXAMPLES", 25)), deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

lengths = st.integers(0, 40)
batches = st.integers(1, 2)
heads = st.sampled_from([(1, 1), (2, 2), (4, 2)])  # (query heads, key/value heads)
chunks = st.sampled_from([1, 4, 16, 64])
seeds = st.integers(0, 2**16)
int_dtypes = st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])


def randn(seed, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def close(name, ref, x, ratio=2e-5, atol=2e-5):
    assert ref.shape == x.shape, f"{name}: {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.numel():
        assert_close(name, ref, x, ratio=ratio, atol=atol)


def pad_mask(B, T, pads, left):
    """`[B, T]` bool: row b has `min(pads[b], T)` padding tokens on the left (or right)."""
    pos = torch.arange(T)
    n = torch.tensor([min(p, T) for p in pads[:B]])
    return pos[None] >= n[:, None] if left else pos[None] < (T - n)[:, None]


# ---- softmax attention -----------------------------------------------------------------------------------

@FEW
@given(B=batches, T=lengths, S=lengths, heads=heads, D=st.sampled_from([1, 4, 8]),
       mode=st.sampled_from(["bidirectional", "causal", "soft_causal", "illama_soft"]), a=st.floats(0, 1),
       backend=st.sampled_from(["sdpa", "explicit"]), pads=st.lists(st.integers(0, 45), min_size=2, max_size=2),
       scale=st.sampled_from([1.0, 30.0]), seed=seeds)
def test_attention_equals_reference(B, T, S, heads, D, mode, a, backend, pads, scale, seed):
    H, Hkv = heads
    q, k, v = randn(seed, B, T, H, D, scale=scale), randn(seed + 1, B, S, Hkv, D), randn(seed + 2, B, S, Hkv, D)
    mask = pad_mask(B, S, pads, left=False)[:, None, None, :]
    out = attention(q, k, v, mask_mode=mode, soft_mask_a=a, attn_mask=mask, backend=backend)
    ref = attention_ref(q, k, v, mask_mode=mode, soft_mask_a=a, attn_mask=mask)
    assert torch.isfinite(out).all()
    close("o", ref, out, ratio=1e-4, atol=1e-4)


@FEW
@given(T=st.integers(2, 30), j=st.integers(0, 29), heads=heads, seed=seeds)
def test_causal_attention_is_causal(T, j, heads, seed):
    H, Hkv = heads
    j = j % T
    q, k, v = randn(seed, 1, T, H, 4), randn(seed + 1, 1, T, Hkv, 4), randn(seed + 2, 1, T, Hkv, 4)
    ref = attention(q, k, v, mask_mode="causal")
    k2, v2 = k.clone(), v.clone()
    k2[:, j] += 5.0
    v2[:, j] -= 3.0
    out = attention(q, k2, v2, mask_mode="causal")
    torch.testing.assert_close(out[:, :j], ref[:, :j], atol=1e-6, rtol=0)


# ---- LightNet ----------------------------------------------------------------------------------------------

def _lightnet_inputs(seed, B, T, H, K, V, key_scale, dtype=torch.float32):
    return (randn(seed, B, T, H, K, dtype=dtype), randn(seed + 1, B, T, H, K, scale=key_scale, dtype=dtype),
            randn(seed + 2, B, T, H, V, dtype=dtype))


@FEW
@given(B=batches, T=lengths, H=st.integers(1, 2), K=st.sampled_from([1, 4]), V=st.sampled_from([1, 3]),
       causal=st.booleans(), chunk=chunks, key_scale=st.sampled_from([0.0, 1.0, 30.0, 1e4]),
       pads=st.lists(st.integers(0, 45), min_size=2, max_size=2), state=st.booleans(),
       normalizer=st.sampled_from(["empty", "unit"]), seed=seeds)
def test_lightnet_equals_reference(B, T, H, K, V, causal, chunk, key_scale, pads, state, normalizer, seed):
    q, k, v = _lightnet_inputs(seed, B, T, H, K, V, key_scale)
    mask = pad_mask(B, T, pads, left=causal)  # left padding is exact for the causal form, right for the global
    s0 = LightNetState(randn(seed + 3, B, H, K, V), randn(seed + 4, B, H, K)) if state else None
    o, st_ = lightnet_attn(q, k, v, causal=causal, mask=mask, chunk_size=chunk, initial_state=s0,
                           output_final_state=True, normalizer_init=normalizer)
    ref, ref_state = lightnet_reference(q, k, v, causal=causal, mask=mask, initial_state=s0,
                                        normalizer_init=normalizer)
    assert torch.isfinite(o).all() and torch.isfinite(st_.S).all()
    close("o", ref, o, ratio=1e-4, atol=1e-4)
    close("S", ref_state.S, st_.S, ratio=1e-4, atol=1e-4)


@FEW
@given(T=st.integers(1, 24), split=st.integers(0, 24), chunk=chunks, seed=seeds)
def test_lightnet_recurrent_and_split_calls_equal_one_call(T, split, chunk, seed):
    q, k, v = _lightnet_inputs(seed, 2, T, 2, 4, 3, 2.0)
    full, _ = lightnet_attn(q, k, v, causal=True, chunk_size=chunk)
    step, _ = lightnet_recurrent(q, k, v)
    close("recurrent", full, step, ratio=1e-4, atol=1e-5)
    split = min(split, T)
    first, state = lightnet_attn(q[:, :split], k[:, :split], v[:, :split], causal=True, chunk_size=chunk,
                                 output_final_state=True)
    second, _ = lightnet_attn(q[:, split:], k[:, split:], v[:, split:], causal=True, chunk_size=chunk,
                              initial_state=state if split else None)
    close("split", full, torch.cat([first, second], 1), ratio=1e-4, atol=1e-5)


@FEW
@given(T=st.integers(2, 30), j=st.integers(0, 29), chunk=chunks, seed=seeds)
def test_lightnet_is_causal(T, j, chunk, seed):
    j = j % T
    q, k, v = _lightnet_inputs(seed, 1, T, 2, 4, 3, 2.0)
    ref, _ = lightnet_attn(q, k, v, causal=True, chunk_size=chunk)
    k2, v2 = k.clone(), v.clone()
    k2[:, j] += 4.0
    v2[:, j] -= 2.0
    out, _ = lightnet_attn(q, k2, v2, causal=True, chunk_size=chunk)
    torch.testing.assert_close(out[:, :j], ref[:, :j], atol=1e-6, rtol=0)


@FEW
@given(T=st.integers(1, 40), causal=st.booleans(), seed=seeds)
def test_lightnet_bfloat16_stays_near_float32(T, causal, seed):
    q, k, v = _lightnet_inputs(seed, 1, T, 2, 4, 4, 2.0)
    ref, _ = lightnet_attn(q, k, v, causal=causal)
    low, _ = lightnet_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal)
    assert low.dtype == torch.bfloat16
    close("bf16", ref, low.float(), ratio=3e-2, atol=3e-2)


# ---- multiplicative decay scan and TPE ---------------------------------------------------------------------

@FEW
@given(B=batches, T=lengths, K=st.sampled_from([1, 4]), V=st.sampled_from([1, 3]), chunk=chunks,
       decay_scale=st.sampled_from([1e-3, 1.0, 50.0]), pads=st.lists(st.integers(0, 45), min_size=2, max_size=2),
       state=st.booleans(), seed=seeds)
def test_decay_scan_equals_reference(B, T, K, V, chunk, decay_scale, pads, state, seed):
    q, k, v = randn(seed, B, T, 2, K), randn(seed + 1, B, T, 2, K), randn(seed + 2, B, T, 2, V)
    g = -randn(seed + 3, B, T, 2, K).abs() * decay_scale
    mask = pad_mask(B, T, pads, left=True)
    s0 = randn(seed + 4, B, 2, K, V) if state else None
    ref, ref_state = decay_attn_reference(q, k, v, g, mask=mask, initial_state=s0)
    for o, s in (decay_attn(q, k, v, g, mask=mask, initial_state=s0, output_final_state=True, chunk_size=chunk),
                 decay_attn_recurrent(q, k, v, g, mask=mask, initial_state=s0, output_final_state=True)):
        assert torch.isfinite(o).all()
        close("o", ref, o, ratio=1e-4, atol=1e-4)
        close("S", ref_state, s, ratio=1e-4, atol=1e-4)


@FEW
@given(h=st.integers(1, 5), w=st.integers(1, 5), directions=st.sampled_from([1, 2, 4]), divide=st.booleans(),
       seed=seeds)
def test_multi_scan_is_the_sum_of_reference_scans_over_the_orders(h, w, directions, divide, seed):
    from polyattn.ops.decay_scan import multi_scan_decay_attn, scan_orders

    T = h * w
    q, k, v = randn(seed, 1, T, 2, 4), randn(seed + 1, 1, T, 2, 4), randn(seed + 2, 1, T, 2, 3)
    g = -randn(seed + 3, 1, T, 2, 4).abs()
    out = multi_scan_decay_attn(q, k, v, g, grid_shape=(h, w), directions=directions, divide=divide, chunk_size=4)
    ref = 0
    for order in scan_orders((h, w), directions):
        o, _ = decay_attn_reference(q[:, order], k[:, order], v[:, order], g[:, order])
        ref = ref + o[:, torch.argsort(order)]
    close("o", ref / directions if divide else ref, out, ratio=1e-4, atol=1e-4)


@FEW
@given(B=batches, T=lengths, d=st.sampled_from([1, 3]), chunk=chunks, direction=st.sampled_from(
    ["causal", "bidirectional"]), decay=st.floats(1e-3, 5.0), seed=seeds)
def test_tpe_scan_equals_reference(B, T, d, chunk, direction, decay, seed):
    x = randn(seed, B, T, 2, d)
    log_decay = -torch.tensor([decay, decay / 2])
    u, _ = tpe_scan(x, log_decay, direction=direction, chunk_size=chunk)
    close("u", tpe_reference(x, log_decay, direction=direction), u, ratio=1e-4, atol=1e-4)


@FEW
@given(T=st.integers(1, 12), shift=st.integers(-50, 50), d=st.sampled_from([2, 6]), rotary=st.booleans(),
       seed=seeds)
def test_lrpe_scores_depend_on_relative_position_only(T, shift, d, rotary, seed):
    from polyattn.ops.lrpe import lrpe_cosine, lrpe_rotary, lrpe_theta, md_lrpe_angles

    q, k = randn(seed, 1, T, 2, d), randn(seed + 1, 1, T, 2, d)
    theta = lrpe_theta(d // 2 if rotary else d, 2)
    encode = lrpe_rotary if rotary else lrpe_cosine

    def scores(offset):
        pos = torch.arange(T, dtype=torch.float32)[:, None] + offset
        angles = md_lrpe_angles(pos, theta, d // 2 if rotary else d)
        return torch.einsum("bthd,bshd->bhts", encode(q, angles), encode(k, angles))

    torch.testing.assert_close(scores(shift), scores(0), atol=1e-3, rtol=1e-3)


# ---- bad dtypes --------------------------------------------------------------------------------------------

@FEW
@given(dtype=int_dtypes, which=st.integers(0, 2), T=st.integers(0, 5))
def test_integer_inputs_are_a_value_error_in_every_op(dtype, which, T):
    inputs = [torch.ones(1, T, 2, 4) for _ in range(3)]
    inputs[which] = inputs[which].to(dtype)
    q, k, v = inputs
    calls = [lambda: attention(q, k, v), lambda: attention_ref(q, k, v),
             lambda: lightnet_attn(q, k, v, causal=True), lambda: lightnet_attn(q, k, v, causal=False),
             lambda: decay_attn(q, k, v, -k.float().abs()), lambda: tpe_scan(q.to(dtype), -torch.ones(2))]
    for call in calls:
        with pytest.raises(ValueError, match="floating-point"):
            call()


# ---- causal models -----------------------------------------------------------------------------------------

def _causal_models():
    from test_lm_models import LMS

    return LMS


@functools.cache
def _model(name):
    from test_lm_models import tiny_lm

    return tiny_lm(name)


@pytest.mark.parametrize("name", _causal_models())
@settings(max_examples=8, deadline=None, derandomize=True)
@given(T=st.integers(1, 20), split=st.integers(0, 20), j=st.integers(0, 19), seed=seeds)
def test_causal_model_cached_equals_full_and_is_causal(name, T, split, j, seed):
    from test_lm_models import V

    model = _model(name)
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(x)
        split = max(1, min(split, T))
        first, cache = model.forward_cached(x[:, :split])
        parts = [first]
        if split < T:
            parts.append(model.forward_cached(x[:, split:], cache)[0])
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)
        j = j % T
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % V
        torch.testing.assert_close(model(y)[:, :j], full[:, :j], atol=1e-6, rtol=0)
        assert torch.isfinite(full).all()
    with pytest.raises(ValueError, match="integer ids"):
        model(x.float())
    with torch.no_grad():
        assert model(x[:, :0]).shape == (2, 0, V)  # T = 0: an empty output
