"""MD-LRPE and MD-TPE ops (spec §9.6–9.7, 9.10)."""

import math

import pytest
import torch

from polyattn.ops.lightnet import lightnet_chunk, lightnet_global
from polyattn.ops.lrpe import (
    lrpe_cosine,
    lrpe_key_features,
    lrpe_rotary,
    lrpe_rotary_query,
    lrpe_theta,
    md_lrpe_angles,
    pair_angles_to_channels,
)
from polyattn.ops.sequence import grid_positions
from polyattn.ops.tpe import (
    md_tpe_scan,
    tpe_axis_scan,
    tpe_causal_scan,
    tpe_matrix_reference,
    tpe_reference,
    tpe_scan,
)
from polyattn.testing import assert_close

B, H, d = 2, 3, 10


def test_theta_shapes_and_spectrum():
    th = lrpe_theta(10, 3, num_axes=3)
    assert th.shape == (3, 4)  # e = ceil(10 / 3)
    assert th[0, 0] == 1.0 and (th.flatten().diff() < 0).all()  # one global spectrum split across heads
    shared = lrpe_theta(8, 2, shared_across_heads=True)
    assert torch.equal(shared[0], shared[1])
    assert math.isclose(shared[0, 1].item(), 10000 ** (-1 / 8), rel_tol=1e-6)


def test_md_angles_channel_split_and_special_tokens():
    pos = grid_positions((3, 4), num_special=2)
    assert pos.shape == (14, 2) and (pos[:2] == 0).all() and pos[2 + 4 * 2 + 3].tolist() == [2.0, 3.0]
    theta = lrpe_theta(d, H, num_axes=2)
    ang = md_lrpe_angles(pos, theta, d)
    assert ang.shape == (14, H, d)
    t = 2 + 1 * 4 + 3  # grid token (1, 3)
    assert torch.allclose(ang[t, :, :5], 1 * theta) and torch.allclose(ang[t, :, 5:], 3 * theta)
    x = torch.randn(1, 14, H, d)
    y = lrpe_cosine(x, ang[None])
    assert y.shape == (1, 14, H, 2 * d)
    assert torch.equal(y[:, :2, :, :d], x[:, :2]) and (y[:, :2, :, d:] == 0).all()  # specials: [x, 0]


def scores(qt, kt):
    return torch.einsum("thd,shd->hts", qt, kt)


def test_md_cosine_scores_shift_invariant_per_axis():
    grid = (4, 5)
    theta = lrpe_theta(d, H, num_axes=2)
    pos = grid_positions(grid)
    q, k = torch.randn(20, H, d, dtype=torch.float64), torch.randn(20, H, d, dtype=torch.float64)
    base = scores(lrpe_cosine(q, md_lrpe_angles(pos, theta, d).double()),
                  lrpe_cosine(k, md_lrpe_angles(pos, theta, d).double()))
    for shift in ([3.0, 0.0], [0.0, -7.0], [2.5, 11.0]):
        ang = md_lrpe_angles(pos + torch.tensor(shift), theta, d).double()
        assert_close(f"shift {shift}", base, scores(lrpe_cosine(q, ang), lrpe_cosine(k, ang)), atol=1e-5)
    # a shift along one axis only moves the channels that axis owns: compare with an explicit formula
    s, t = 7, 13
    ps, pt = pos[s], pos[t]
    th = theta.double()
    expect = (q[s, :, :5] * k[t, :, :5] * torch.cos((ps[0] - pt[0]) * th)).sum(-1) + (
        q[s, :, 5:] * k[t, :, 5:] * torch.cos((ps[1] - pt[1]) * th)).sum(-1)
    assert_close("score formula", expect, base[:, s, t], atol=1e-5)


def test_cosine_lrpe_is_exact_under_the_causal_vector_decay():
    """Shifting every position leaves the causal LightNet output unchanged (the decay is shared by cos/sin copies)."""
    T, K = 40, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, H, K, generator=g, dtype=torch.float64), torch.randn(1, T, H, K, generator=g)
    v = torch.randn(1, T, H, 4, generator=g)
    theta = lrpe_theta(K, H, base=100.0)
    outs = []
    for offset in (0.0, 37.0):
        ang = md_lrpe_angles((torch.arange(T) + offset)[:, None], theta, K)[None].double()
        o, _ = lightnet_chunk(lrpe_cosine(q, ang), k, v, key_features=lrpe_key_features(ang))
        outs.append(o)
    assert_close("shifted", outs[0], outs[1], atol=1e-4)


def test_rotary_query_form_equals_plain_rotary_noncausal():
    T, K = 30, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, T, H, n, generator=g) for n in (K, K, 5))
    pair = md_lrpe_angles(torch.arange(T, dtype=torch.float32)[:, None], lrpe_theta(K // 2, H), K // 2)[None]
    ang = pair_angles_to_channels(pair)
    o, _ = lightnet_global(lrpe_rotary_query(q, pair), k, v, key_features=lrpe_key_features(ang))
    kt = torch.softmax(k, dim=1)
    expect = torch.einsum("bthk,bshk,bshv->bthv", lrpe_rotary(q, pair), lrpe_rotary(kt, pair), v)
    assert_close("rotary", expect, o, atol=1e-5)
    # the rotary form is also shift invariant under the causal decay
    outs = [lightnet_chunk(lrpe_rotary_query(q, pair + s * pair[:, 1:2]), k, v,
                           key_features=lrpe_key_features(ang + s * ang[:, 1:2]))[0] for s in (0.0, 5.0)]
    assert_close("rotary shifted", outs[0], outs[1], atol=1e-4)


# --- TPE -----------------------------------------------------------------------------------------------------

def make_x(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, d, generator=g), -torch.rand(H, generator=g) * 2 - 0.05


@pytest.mark.parametrize("T", [1, 63, 100, 257], ids=lambda t: f"T{t}")
def test_tpe_causal_matches_reference(T):
    x, ld = make_x(T)
    for cs in (16, 64):
        u, st = tpe_causal_scan(x, ld, chunk_size=cs)
        ref = tpe_reference(x, ld)
        assert_close("u", ref, u, atol=1e-5)
        assert_close("state", ref[:, -1], st, atol=1e-5)


def test_tpe_vector_equals_matrix_state_form():
    x, ld = make_x(50)
    g = torch.Generator().manual_seed(3)
    qv, kv = torch.randn(H, d, generator=g), torch.randn(H, d, generator=g)
    u, _ = tpe_scan(x, ld)
    expect = tpe_matrix_reference(x, ld, qv, kv)
    assert_close("matrix", expect, (qv * kv).sum(-1)[:, None] * u, atol=1e-5)


def test_tpe_two_sided_and_resume():
    x, ld = make_x(70)
    u, st = tpe_scan(x, ld, direction="bidirectional")
    assert st is None
    ref = tpe_reference(x, ld, direction="bidirectional")
    assert_close("two-sided", ref, u, atol=1e-5)
    fwd = tpe_reference(x, ld)
    bwd = tpe_reference(x.flip(1), ld).flip(1)
    assert_close("fwd + bwd − x", fwd + bwd - x.double(), u, atol=1e-5)
    u1, s1 = tpe_scan(x[:, :33], ld)
    u2, _ = tpe_scan(x[:, 33:], ld, initial_state=s1)
    assert_close("split", fwd, torch.cat([u1, u2], 1), atol=1e-5)


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_md_tpe_is_the_sum_of_explicit_per_axis_sums(direction):
    hgt, wid = 4, 6
    x, _ = make_x(hgt * wid)
    lds = -torch.rand(2, H) - 0.1
    out = md_tpe_scan(x, (hgt, wid), lds, direction=direction)
    grid = x.double().view(B, hgt, wid, H, d)
    i = torch.arange(hgt, dtype=torch.float64)
    j = torch.arange(wid, dtype=torch.float64)
    di, dj = i[:, None] - i[None], j[:, None] - j[None]
    if direction == "causal":
        wi = torch.exp(lds[0].double()[:, None, None] * di.clamp_min(0)) * (di >= 0)
        wj = torch.exp(lds[1].double()[:, None, None] * dj.clamp_min(0)) * (dj >= 0)
    else:
        wi = torch.exp(lds[0].double()[:, None, None] * di.abs())
        wj = torch.exp(lds[1].double()[:, None, None] * dj.abs())
    expect = torch.einsum("hia,bajhd->bijhd", wi, grid) + torch.einsum("hjc,bichd->bijhd", wj, grid)
    assert_close("md", expect.reshape(B, -1, H, d), out, atol=1e-5)


def test_md_tpe_transposition():
    hgt, wid = 3, 5
    x, _ = make_x(hgt * wid)
    lds = -torch.rand(2, H) - 0.1
    out = md_tpe_scan(x, (hgt, wid), lds, direction="bidirectional")
    xt = x.view(B, hgt, wid, H, d).transpose(1, 2).reshape(B, -1, H, d)
    out_t = md_tpe_scan(xt, (wid, hgt), lds.flip(0), direction="bidirectional")
    assert_close("transposed", out.view(B, hgt, wid, H, d).transpose(1, 2).reshape(B, -1, H, d), out_t, atol=1e-5)


def test_causal_tpe_causality():
    x, ld = make_x(40)
    x.requires_grad_()
    u = tpe_axis_scan(x, (40,), 0, ld)
    u[:, 17].sum().backward()
    assert (x.grad[:, 18:] == 0).all() and (x.grad[:, :18] != 0).any()
