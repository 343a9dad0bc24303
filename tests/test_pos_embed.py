"""Absolute position embeddings: sin-cos tables and resampling over the grid with special-token slots kept."""

import pytest
import torch

from polyattn.errors import UserError
from polyattn.layers.pos_embed import LearnedPosEmbed, resample_abs_pos_embed, sincos_pos_embed
from polyattn.testing import assert_close


def mae_1d(dim, pos):
    """MAE's `get_1d_sincos_pos_embed_from_grid`, transcribed."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


def test_sincos_1d_and_2d_match_mae_formula():
    assert_close("1-D", mae_1d(16, torch.arange(7)), sincos_pos_embed((7,), 16), ratio=1e-6, atol=1e-6)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    # blocks ordered by axis: rows first (MAE itself puts the column block first)
    expected = torch.cat([mae_1d(8, rows), mae_1d(8, cols)], dim=1)
    table = sincos_pos_embed((3, 4), 16)
    assert table.shape == (12, 16) and table.dtype == torch.float32
    assert_close("2-D", expected, table, ratio=1e-6, atol=1e-6)


def test_sincos_nd_blocks_follow_their_axis():
    table = sincos_pos_embed((2, 3, 4), 24).reshape(2, 3, 4, 24)
    # moving along the last axis changes only its block of 8 channels
    diff = (table[:, :, 1:] - table[:, :, :-1]).abs().amax(dim=(0, 1, 2))
    assert torch.equal(diff[:16], torch.zeros(16)) and diff[16:].min() > 0
    with pytest.raises(ValueError, match="multiple"):
        sincos_pos_embed((2, 3, 4), 20)


def test_resample_identity_when_grids_are_equal():
    pe = torch.randn(1, 1 + 14 * 14, 16)
    assert torch.equal(resample_abs_pos_embed(pe, (14, 14), (14, 14)), pe)


@pytest.mark.parametrize("prefix_at_end", [False, True], ids=["cls-first", "cls-last"])
def test_resample_keeps_special_slots(prefix_at_end):
    grid = torch.randn(1, 14 * 14, 16)
    cls = torch.randn(1, 1, 16)
    pe = torch.cat((grid, cls) if prefix_at_end else (cls, grid), dim=1)
    out = resample_abs_pos_embed(pe, (24, 24), (14, 14), num_prefix_tokens=1, prefix_at_end=prefix_at_end)
    assert out.shape == (1, 1 + 24 * 24, 16)
    assert torch.equal(out[:, -1:] if prefix_at_end else out[:, :1], cls)


@pytest.mark.parametrize("prefix_at_end", [False, True], ids=["cls-first", "cls-last"])
def test_resample_reproduces_a_smooth_embedding(prefix_at_end):
    """A table linear in the (pixel-centre) coordinates is resampled to the same linear function."""

    def linear_table(h, w):
        # patch centres in [0, 1] image coordinates, the convention of align_corners=False
        y = (torch.arange(h) + 0.5) / h
        x = (torch.arange(w) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        coeffs = torch.linspace(-1, 1, 8)
        return (yy[..., None] * coeffs + xx[..., None] * coeffs.flip(0) + 0.1).reshape(1, h * w, 8)

    reg = torch.randn(1, 2, 8)  # two register/cls slots
    old = linear_table(14, 14)
    pe = torch.cat((old, reg) if prefix_at_end else (reg, old), dim=1)
    out = resample_abs_pos_embed(pe, (24, 20), (14, 14), num_prefix_tokens=2, prefix_at_end=prefix_at_end)
    grid = out[:, :-2] if prefix_at_end else out[:, 2:]
    inner = grid.reshape(24, 20, 8)[2:-2, 2:-2]  # the borders are extrapolated by clamping
    assert_close("linear", linear_table(24, 20).reshape(24, 20, 8)[2:-2, 2:-2], inner, ratio=1e-3, atol=1e-3)


def test_resample_errors():
    with pytest.raises(UserError, match="prefix"):
        resample_abs_pos_embed(torch.randn(1, 50, 8), (4, 4), (7, 7), num_prefix_tokens=2)
    with pytest.raises(ValueError):
        resample_abs_pos_embed(torch.randn(1, 16, 8), (4, 4, 1), (4, 4), num_prefix_tokens=0)


def test_resample_1d_and_3d_grids():
    pe = torch.randn(1, 1 + 10, 4)
    assert resample_abs_pos_embed(pe, (15,), (10,)).shape == (1, 16, 4)
    pe = torch.randn(1, 2 * 3 * 4, 4)
    assert resample_abs_pos_embed(pe, (4, 3, 2), (2, 3, 4), num_prefix_tokens=0).shape == (1, 24, 4)


def test_learned_pos_embed():
    pe = LearnedPosEmbed((4, 4), 8, num_prefix_tokens=1, prefix_at_end=True)
    assert pe.pos_embed.shape == (1, 17, 8) and 0 < pe.pos_embed.std() < 0.05
    x = torch.zeros(2, 17, 8)
    assert torch.equal(pe(x), pe.pos_embed.expand(2, -1, -1))
    y = pe(torch.zeros(2, 1 + 36, 8), grid_size=(6, 6))
    assert y.shape == (2, 37, 8) and torch.equal(y[:, -1], pe.pos_embed[:, -1].expand(2, -1))
    pe.resize((6, 6))
    assert pe.pos_embed.shape == (1, 37, 8) and pe.grid_size == (6, 6)
    assert torch.equal(pe.pos_embed, y[:1])

    sc = LearnedPosEmbed((3, 4), 16, num_prefix_tokens=1, init="sincos")
    assert torch.equal(sc.pos_embed[0, 0], torch.zeros(16))
    assert torch.equal(sc.pos_embed[0, 1:], sincos_pos_embed((3, 4), 16))
    with pytest.raises(ValueError, match="init"):
        LearnedPosEmbed((2, 2), 8, init="zeros")
