"""The multiplicative decay baseline: chunked and recurrent forms against float64 direct sums; multi-scan."""

import pytest
import torch
import torch.nn.functional as F

from polyattn.ops import chunk_gated
from polyattn.ops.decay_scan import (
    decay_attn,
    decay_attn_recurrent,
    decay_attn_reference,
    multi_scan_decay_attn,
    scan_orders,
)
from polyattn.testing import assert_close

B, H, K, V = 2, 2, 8, 6


def make(T, seed=42):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    logd = F.logsigmoid(torch.randn(B, T, H, K, generator=g) * 2 + 2)
    s0 = torch.randn(B, H, K, V, generator=g)
    return q, k, v, logd, s0


def grads(fn, *inputs, seed=7):
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, st = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (st.double() * torch.randn(st.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    return [o, st] + [x.grad for x in leaves]


CASES = [(form, T) for form in ("chunk16", "chunk64") for T in (1, 63, 100, 257)] + [
    ("recurrent", T) for T in (1, 63, 100)]  # the token loop is slow; short lengths suffice


@pytest.mark.parametrize(("form", "T"), CASES, ids=[f"{f}-T{t}" for f, t in CASES])
def test_forms_match_reference_forward_and_backward(form, T):
    inputs = make(T)
    ref = grads(lambda q, k, v, g, s: decay_attn_reference(q, k, v, g, initial_state=s), *inputs)
    if form == "recurrent":
        fn = lambda q, k, v, g, s: decay_attn_recurrent(q, k, v, g, initial_state=s, output_final_state=True)
    else:
        cs = int(form[5:])
        fn = lambda q, k, v, g, s: decay_attn(q, k, v, g, initial_state=s, output_final_state=True, chunk_size=cs)
    out = grads(fn, *inputs)
    for name, r, x in zip(["o", "S", "dq", "dk", "dv", "dg", "dS0"], ref, out):
        assert_close(name, r, x, ratio=2e-5, atol=2e-5)


def test_strong_decay_is_stable():
    """Log-decays down to −60 per step (λ ≈ 1e−26): chunk-local cumulative sums keep everything finite."""
    q, k, v, _, _ = make(200)
    g = -torch.rand(B, 200, H, K) * 60
    o, st = decay_attn(q, k, v, g, output_final_state=True)
    ref, rst = decay_attn_reference(q, k, v, g)
    assert_close("o", ref, o, ratio=1e-5, atol=1e-5)
    assert_close("S", rst, st, ratio=1e-5, atol=1e-5)


def test_padding_leaves_state_unchanged():
    q, k, v, g, _ = make(30)
    mask = torch.ones(B, 30, dtype=torch.bool)
    mask[1, :12] = False
    o, st = decay_attn(q, k, v, g, mask=mask, output_final_state=True)
    ref, rst = decay_attn_reference(q[1:, 12:], k[1:, 12:], v[1:, 12:], g[1:, 12:])
    assert_close("o", ref[0], o[1, 12:], atol=1e-5)
    assert_close("S", rst[0], st[1], atol=1e-5)
    assert (o[1, :12] == 0).all()


def test_scan_orders():
    row, rev, col, colrev = scan_orders((2, 3), 4)
    assert row.tolist() == [0, 1, 2, 3, 4, 5]
    assert rev.tolist() == [5, 4, 3, 2, 1, 0]
    assert col.tolist() == [0, 3, 1, 4, 2, 5]
    assert colrev.tolist() == col.flip(0).tolist()


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_multi_scan_is_the_sum_of_single_scans(directions):
    hgt, wid = 4, 5
    q, k, v, g, _ = make(hgt * wid)
    out = multi_scan_decay_attn(q, k, v, g, grid_shape=(hgt, wid), directions=directions)
    expect = 0
    for order in scan_orders((hgt, wid), directions):
        o, _ = decay_attn_reference(q[:, order], k[:, order], v[:, order], g[:, order])
        expect = expect + o[:, torch.argsort(order)]
    assert_close("o", expect, out, atol=1e-5)
    avg = multi_scan_decay_attn(q, k, v, g, grid_shape=(hgt, wid), directions=directions, divide=True)
    assert_close("divided", expect / directions, avg, atol=1e-5)


def test_per_direction_inputs():
    q, k, v, g, _ = make(12)
    qs = [q, q * 2]
    out = multi_scan_decay_attn(qs, k, v, g, grid_shape=(3, 4), directions=2)
    fwd, _ = decay_attn(q, k, v, g)
    bwd, _ = decay_attn((2 * q).flip(1), k.flip(1), v.flip(1), g.flip(1))
    assert_close("o", fwd + bwd.flip(1), out, atol=1e-5)


def test_single_direction_scan_depends_on_flattening_order():
    """Contrast with LightNet's global form: row- vs column-major flattening changes the one-scan output."""
    hgt, wid = 5, 7
    q, k, v, g, _ = make(hgt * wid)
    perm = torch.arange(hgt * wid).view(hgt, wid).t().reshape(-1)
    row = multi_scan_decay_attn(q, k, v, g, grid_shape=(hgt, wid), directions=1)
    col = multi_scan_decay_attn(q[:, perm], k[:, perm], v[:, perm], g[:, perm], grid_shape=(wid, hgt), directions=1)
    assert (row[:, perm] - col).abs().max() > 1e-2


def test_grouped_chunks_match_reference(monkeypatch):
    """decay_attn with one chunk per group (state and its gradient carried across groups) vs the float64 sums."""
    monkeypatch.setattr(chunk_gated, "GROUP_ELEMENTS", 1)
    inputs = make(100)
    ref = grads(lambda q, k, v, g, s: decay_attn_reference(q, k, v, g, initial_state=s), *inputs)
    out = grads(lambda q, k, v, g, s: decay_attn(q, k, v, g, initial_state=s, output_final_state=True, chunk_size=16),
                *inputs)
    for name, r, x in zip(["o", "S", "dq", "dk", "dv", "dg", "dS0"], ref, out):
        assert_close(name, r, x, ratio=2e-5, atol=2e-5)
