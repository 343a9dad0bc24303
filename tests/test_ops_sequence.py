"""Sequence bookkeeping (`polyattn.ops.sequence`) against plain Python loops."""

import itertools

import pytest
import torch

from polyattn.ops.sequence import (
    cat_padding_masks,
    check_cu_seqlens,
    document_positions,
    grid_positions,
    pack_sequences,
    real_counts,
    real_positions,
    unpack_sequences,
)


def random_mask(B, T, seed=0):
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.6


@pytest.mark.parametrize("seed", range(4))
def test_real_positions_count_the_real_tokens_before_each(seed):
    B, T = 3, 9
    mask = random_mask(B, T, seed)
    start = torch.tensor([0, 4, 11])
    pos = real_positions(mask, start=start)
    for b in range(B):
        count = 0
        for t in range(T):
            if mask[b, t]:
                assert pos[b, t] == start[b] + count  # a real token: the real tokens before it
                count += 1
            else:  # a padding slot: the position of the real token before it (the first one's before any)
                assert pos[b, t] == start[b] + max(count - 1, 0)
    # padded rows equal their unpadded versions at the real slots
    for b in range(B):
        alone = real_positions(None, int(mask[b].sum()), start=int(start[b]))
        assert torch.equal(pos[b][mask[b]], alone)
    assert real_positions(None, 5).tolist() == [0, 1, 2, 3, 4]  # no mask, an int start: one row for every row
    assert real_positions(None, 3, start=2, batch_size=2).tolist() == [[2, 3, 4]] * 2
    assert real_positions(None, 2, start=torch.tensor([1, 5])).tolist() == [[1, 2], [5, 6]]
    left = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert real_positions(left).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]  # left padding: slots at 0
    with pytest.raises(ValueError, match="length"):
        real_positions(None)


def test_real_counts_and_joined_masks():
    mask = random_mask(3, 7)
    assert real_counts(mask, 7, batch_size=3).tolist() == [sum(r) for r in mask.tolist()]
    assert real_counts(None, 7, batch_size=2).tolist() == [7, 7]
    assert cat_padding_masks(None, None, (2, 3), (2, 4)) is None
    joined = cat_padding_masks(None, mask[:2, :4], (2, 3), (2, 4))
    assert joined.tolist() == [[True] * 3 + r for r in mask[:2, :4].tolist()]
    joined = cat_padding_masks(mask[:2, :3], None, (2, 3), (2, 4))
    assert joined.tolist() == [r + [True] * 4 for r in mask[:2, :3].tolist()]


LENGTHS = [[3, 1, 5], [4], [2, 0, 6, 1]]  # an empty document as well


@pytest.mark.parametrize("lengths", LENGTHS)
def test_document_positions_equal_a_loop(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    doc, pos = document_positions(cu, sum(lengths))
    expect_doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    expect_pos = [i for n in lengths for i in range(n)]
    assert doc.tolist() == expect_doc and pos.tolist() == expect_pos


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("left_pad", [False, True])
def test_unpack_then_pack_is_the_identity_and_the_layout_equals_a_loop(lengths, left_pad):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.arange(1, total + 1).float()[None, :, None].expand(1, total, 2)  # [1, ΣT, 2], no zeros
    padded, mask = unpack_sequences(x, cu, left_pad=left_pad)
    T = max(lengths)
    assert padded.shape == (len(lengths), T, 2) and mask.shape == (len(lengths), T)
    for d, n in enumerate(lengths):
        docs = x[0, int(cu[d]):int(cu[d + 1])]
        first = T - n if left_pad else 0
        assert mask[d].tolist() == [first <= t < first + n for t in range(T)]
        assert torch.equal(padded[d, first:first + n], docs)
        assert (padded[d][~mask[d]] == 0).all()
    assert torch.equal(pack_sequences(padded, mask), x)
    if left_pad:  # outputs of the last L columns only: each document's last min(n, L) rows, in order
        L = 2
        expect = torch.cat([x[0, int(cu[d + 1]) - min(n, L):int(cu[d + 1])] for d, n in enumerate(lengths)])
        assert torch.equal(pack_sequences(padded[:, -L:], mask), expect[None])


@pytest.mark.parametrize("cu, total", [
    (torch.tensor([1, 3]), 3),  # does not start at 0
    (torch.tensor([0, 2]), 3),  # does not end at the packed length
    (torch.tensor([0, 3, 2, 3]), 3),  # falls
    (torch.tensor([0.0, 3.0]), 3),  # not integers
    (torch.tensor([3]), 3),  # no document
    (torch.tensor([[0, 3]]), 3),  # not one row of offsets
])
def test_one_validation_message_for_every_bad_cu_seqlens(cu, total):
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[N \+ 1\] integer offsets rising from 0 to the "
                                         rf"packed length {total}"):
        check_cu_seqlens(cu, total)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        unpack_sequences(torch.zeros(1, total), cu)


def test_unpack_refuses_more_than_one_row():
    with pytest.raises(ValueError, match="B == 1"):
        unpack_sequences(torch.zeros(2, 3), torch.tensor([0, 3]))


@pytest.mark.parametrize("shape, special", [((2, 3), 0), ((3, 4), 2), ((2, 3, 4), 1), ((5,), 0)])
def test_grid_positions_are_raster_coordinates_after_the_special_tokens(shape, special):
    pos = grid_positions(shape, special)
    expect = [[0] * len(shape)] * special + [list(c) for c in itertools.product(*[range(n) for n in shape])]
    assert pos.dtype == torch.long and pos.tolist() == expect
