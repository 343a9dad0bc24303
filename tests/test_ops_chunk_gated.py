"""The chunk kernel shared by LightNet and the decay scan: hand-written backward against gradcheck and against its
readable autograd form, with the chunks split into groups."""

import pytest
import torch

from polyattn.ops import chunk_gated as cg
from polyattn.testing import assert_close


def _core_inputs(B, H, N, C, R, K, V, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, C, R, K, generator=g, dtype=dtype)
    k = torch.randn(B, H, N, C, R, K, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, C, V, generator=g, dtype=dtype)
    z = (torch.rand(B, H, N, C, K, generator=g, dtype=dtype) * 3).cumsum(3)  # non-decreasing inside a chunk
    z_prev = z[..., 0, :] - torch.rand(B, H, N, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, R * K, V, generator=g, dtype=dtype)
    return q, k, v, z, z_prev, s0


@pytest.mark.parametrize("R", [1, 2])
def test_chunk_core_hand_written_backward_gradcheck(R, monkeypatch):
    """The hand-written backward of the chunk engine, float64, with the chunks split into groups of one and two."""
    for group in (1, 2):
        monkeypatch.setattr(cg, "GROUP_ELEMENTS", group * 2 * 4 * R * 3)  # B·H·C·R·K per chunk = 2·4·R·3
        inputs = [x.requires_grad_() for x in _core_inputs(1, 2, 3, 4, R, 3, 2)]
        assert torch.autograd.gradcheck(lambda *a: cg.ChunkGatedCore.apply(*a, torch.float64), inputs)


@pytest.mark.parametrize("group", [1, 3, 1 << 20], ids=["g1", "g3", "one-group"])
def test_chunk_core_matches_autograd_form(group, monkeypatch):
    """Fast engine (hand-written backward, grouped chunks) against the readable autograd form, float32, 64 chunks."""
    B, H, N, C, R, K, V = 2, 2, 5, 16, 2, 4, 3
    monkeypatch.setattr(cg, "GROUP_ELEMENTS", group * B * H * C * R * K)
    inputs = _core_inputs(B, H, N, C, R, K, V, dtype=torch.float32)

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, s = fn(*leaves, torch.float32)
        gen = torch.Generator().manual_seed(1)
        ((o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()).backward()
        return [o, s] + [x.grad for x in leaves]

    for name, r, x in zip(["o", "S", "dq", "dk", "dv", "dz", "dz_prev", "dS0"],
                          run(cg.chunk_gated_core_autograd), run(cg.chunk_gated_core)):
        assert_close(name, r, x, ratio=1e-5, atol=1e-5)


def test_token_layout_round_trip():
    """to_chunks pads the end of time with zeros and moves heads first; from_chunks undoes it and drops the pad."""
    x = torch.randn(2, 37, 3, 4, 5)
    c = cg.to_chunks(x, 16)  # [B, H, N, C, ...]
    assert c.shape == (2, 3, 3, 16, 4, 5)
    assert torch.equal(c[:, 1, 0, 5], x[:, 5, 1]) and torch.equal(c[:, 2, 2, 4], x[:, 36, 2])
    assert (c[:, :, 2, 5:] == 0).all()
    assert torch.equal(cg.from_chunks(c, 37), x)
    assert torch.equal(cg.pad_time(x, 3, -1.0)[:, 37:], torch.full((2, 3, 3, 4, 5), -1.0))


@pytest.mark.parametrize("op", ["decay_attn", "lightnet_attn"])
def test_chunk_length_errors_name_the_op(op):
    from polyattn.ops import decay_attn, lightnet_attn

    q = torch.randn(1, 8, 1, 4)
    call = {"decay_attn": lambda: decay_attn(q, q, q, -q.abs(), chunk_size=12),
            "lightnet_attn": lambda: lightnet_attn(q, q, q, causal=True, chunk_size=12)}[op]
    with pytest.raises(ValueError, match=f"^{op}: chunk_size must be a power of two, got 12"):
        call()
    assert cg.chunk_len(op, 64, 5) == 8 and cg.chunk_len(op, 16, 100) == 16 and cg.chunk_len(op, 64, 1) == 1
