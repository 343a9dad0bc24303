"""RoPE: layouts against a complex-multiplication reference, the relative-position property, N-D axes."""

import pytest
import torch

from polyattn.layers.rope import (
    RotaryEmbedding,
    RotaryEmbeddingND,
    apply_rotary,
    axial_frequencies,
)
from polyattn.ops.sequence import grid_positions, real_positions
from polyattn.testing import assert_close


def rope_complex_ref(x, positions, base=10000.0):
    """Meta LLaMA's rotation: pairs (2i, 2i+1) as complex numbers times `polar(1, t·θ_i)`."""
    D = x.shape[-1]
    theta = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs_cis = torch.polar(torch.ones(len(positions), D // 2, dtype=torch.float64),
                            torch.outer(positions.double(), theta))  # (T, D/2) complex
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def scores(q, k):
    """Per-head dot products `[B, H, T, S]`."""
    return torch.einsum("bthd,bshd->bhts", q.double(), k.double())


def test_frequencies():
    i = torch.arange(8, dtype=torch.float64)
    assert_close("1-D", 500.0 ** (-2 * i / 16)[None], axial_frequencies(16, 1, 500.0), ratio=1e-12, atol=0.0)
    freqs = axial_frequencies(14, 2, 100.0)  # 7 pairs: 3 per axis, the last unrotated
    theta = 100.0 ** (-2 * torch.arange(3, dtype=torch.float64) / 6)
    expected = torch.zeros(2, 7, dtype=torch.float64)
    expected[0, :3], expected[1, 3:6] = theta, theta
    assert_close("2-D", expected, freqs, ratio=1e-12, atol=0.0)
    assert len(RotaryEmbedding(16).state_dict()) == 0
    assert RotaryEmbedding(16).bfloat16()(torch.arange(3)).cos.dtype == torch.float32


def test_interleaved_matches_complex_reference():
    x = torch.randn(2, 11, 3, 16)
    pos = torch.arange(11) + 5
    out = RotaryEmbedding(16)(pos).apply(x)
    assert_close("rotated", rope_complex_ref(x, pos), out, ratio=1e-6, atol=1e-5)
    assert not torch.allclose(out, x)


def test_half_split_is_the_interleaved_rotation_of_permuted_channels():
    D = 16
    x = torch.randn(2, 7, 3, D)
    pos = torch.arange(7)
    # channel i of the first half pairs with i + D/2; interleave the halves to get the Meta layout.
    perm = torch.stack((torch.arange(D // 2), torch.arange(D // 2) + D // 2), dim=-1).flatten()
    half = RotaryEmbedding(D, interleaved=False)(pos).apply(x)
    inter = RotaryEmbedding(D, interleaved=True)(pos).apply(x[..., perm])
    assert_close("half-split", inter, half[..., perm], ratio=1e-6, atol=1e-6)
    assert not torch.allclose(half, RotaryEmbedding(D)(pos).apply(x))


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half-split"])
def test_scores_depend_only_on_relative_position(interleaved):
    rope = RotaryEmbedding(32, interleaved=interleaved)
    q, k = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32)

    def score(s, t):
        return scores(rope(torch.tensor([s])).apply(q), rope(torch.tensor([t])).apply(k))

    for delta in (0, 3, -5):
        base = score(10 + delta, 10)
        for shift in (-10, 7, 123, 1000):
            assert_close(f"delta {delta} shift {shift}", base, score(10 + delta + shift, 10 + shift), 1e-5, 1e-5)
    assert not torch.allclose(score(13, 10), score(10, 10), atol=1e-3)


def test_per_row_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(3, 5, 2, 8)
    pos = torch.arange(5)[None, :] + torch.tensor([[0], [3], [17]])  # (B, T)
    out = rope(pos).apply(x)
    for b in range(3):
        assert_close(f"row {b}", rope(pos[b]).apply(x[b:b + 1]), out[b:b + 1], ratio=1e-6, atol=1e-6)


def test_nan_positions_are_not_rotated():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 4, 2, 8)
    out = rope(torch.tensor([0.0, 1.0, float("nan"), 3.0])).apply(x)
    assert torch.equal(out[:, 2], x[:, 2])
    assert not torch.allclose(out[:, 3], x[:, 3])


def test_bf16_is_rotated_in_fp32_and_cast_back():
    x = torch.randn(2, 9, 2, 16).bfloat16()
    pos = torch.arange(9) * 1000  # large angles: a bf16 angle computation would be far off
    out = RotaryEmbedding(16)(pos).apply(x)
    assert out.dtype == torch.bfloat16
    assert_close("bf16", rope_complex_ref(x.float(), pos).float(), out, ratio=1e-2, atol=0.0)


def test_apply_rotary_checks_width():
    rot = RotaryEmbedding(8)(torch.arange(3))
    with pytest.raises(ValueError, match="channels"):
        apply_rotary(torch.randn(1, 3, 2, 10), rot.cos, rot.sin)


def test_positions_helpers():
    kpm = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert real_positions(kpm).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert grid_positions((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


# --- N-D RoPE ---


def test_nd_with_one_axis_equals_1d():
    x = torch.randn(2, 6, 2, 12)
    pos = torch.arange(6)
    assert_close("1 axis", RotaryEmbedding(12)(pos).apply(x), RotaryEmbeddingND(12, 1)(pos[:, None]).apply(x),
                 ratio=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nd_equal_shift_on_one_axis_leaves_scores_unchanged(axis):
    rope = RotaryEmbeddingND(24, num_axes=3)
    pos = grid_positions((2, 3, 4)).float()  # (24, 3)
    q, k = torch.randn(1, 24, 2, 24), torch.randn(1, 24, 2, 24)
    base = scores(rope(pos).apply(q), rope(pos).apply(k))
    shifted = pos.clone()
    shifted[:, axis] += 37
    assert_close("equal shift", base, scores(rope(shifted).apply(q), rope(shifted).apply(k)), 1e-5, 1e-5)
    unequal = scores(rope(shifted).apply(q), rope(pos).apply(k))
    assert not torch.allclose(base, unequal, atol=1e-3)


def test_nd_axes_own_disjoint_channels():
    D, A = 20, 3  # 10 pairs: 3 per axis, the last pair unrotated
    rope = RotaryEmbeddingND(D, num_axes=A)
    assert rope.pairs_per_axis == 3
    x = torch.randn(1, 5, 2, D)
    pos = torch.randint(0, 9, (5, A)).float()
    out = rope(pos).apply(x)
    assert torch.equal(out[..., 18:], x[..., 18:])
    for a in range(A):
        moved = pos.clone()
        moved[:, a] += 5
        out2 = rope(moved).apply(x)
        own = slice(6 * a, 6 * (a + 1))  # interleaved: pairs [3a, 3a + 3) are channels [6a, 6a + 6)
        assert not torch.allclose(out[..., own], out2[..., own])
        others = torch.ones(D, dtype=torch.bool)
        others[own] = False
        assert torch.equal(out[..., others], out2[..., others])


def test_nd_nan_coordinates_leave_tokens_unrotated():
    rope = RotaryEmbeddingND(16, num_axes=2)
    pos = torch.cat([grid_positions((2, 2)).float(), torch.full((1, 2), float("nan"))])  # a cls token last
    x = torch.randn(2, 5, 2, 16)
    out = rope(pos[None].expand(2, -1, -1)).apply(x)
    assert torch.equal(out[:, -1], x[:, -1])
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="positions"):
        rope(torch.zeros(5, 3))
