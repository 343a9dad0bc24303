"""Batch loading (deterministic, resumable order) and batch augmentation (generator-driven, vectorised)."""

import pytest
import torch

from polyattn.data.images import ImageDataset
from polyattn.data.loader import BatchLoader
from polyattn.data.transforms import (
    EvalTransform,
    TrainAugment,
    channel_stats,
    normalize,
    resize_center_crop,
)
from polyattn.errors import UserError


def tiny_dataset(n=23, c=3, h=8, w=8, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # a sample id in the first pixel
    return ImageDataset(images, torch.arange(n) % 5, [str(i) for i in range(5)], "test")


# ---- BatchLoader -----------------------------------------------------------------------------------------

def ids(batches):
    return [x[:, 0, 0, 0].tolist() for x, _ in batches]


def flat_ids(batches):
    return [i for x, _ in batches for i in x[:, 0, 0, 0].tolist()]


def test_batches_cover_the_epoch_once():
    ds = tiny_dataset()
    loader = BatchLoader(ds, 5, shuffle=True, seed=1)
    assert len(loader) == 5
    batches = list(loader.epoch(0))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    assert sorted(flat_ids(batches)) == list(range(23))
    for x, y in batches:
        assert x.dtype == torch.uint8 and torch.equal(y, ds.labels[x[:, 0, 0, 0].long()])
    dropped = BatchLoader(ds, 5, shuffle=True, seed=1, drop_last=True)
    assert len(dropped) == 4 and [len(y) for _, y in dropped.epoch(0)] == [5, 5, 5, 5]


def test_order_is_a_function_of_seed_and_epoch():
    ds = tiny_dataset()
    a, b = BatchLoader(ds, 4, shuffle=True, seed=7), BatchLoader(ds, 4, shuffle=True, seed=7)
    assert ids(a.epoch(3)) == ids(b.epoch(3))
    assert ids(a.epoch(3)) != ids(a.epoch(4))
    assert ids(a.epoch(3)) != ids(BatchLoader(ds, 4, shuffle=True, seed=8).epoch(3))
    expected = torch.randperm(23, generator=torch.Generator().manual_seed(7 * 100003 + 3))
    assert flat_ids(a.epoch(3)) == expected.tolist()
    assert flat_ids(BatchLoader(ds, 4, shuffle=False).epoch(3)) == list(range(23))


@pytest.mark.parametrize("start", [0, 1, 3, 6])
def test_resume_at_a_batch_gives_the_remaining_batches(start):
    ds = tiny_dataset()
    loader = BatchLoader(ds, 4, shuffle=True, seed=2)
    full = list(loader.epoch(5))
    resumed = list(BatchLoader(ds, 4, shuffle=True, seed=2).epoch(5, start_batch=start))
    assert len(resumed) == len(full) - start
    for (x0, y0), (x1, y1) in zip(full[start:], resumed):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_loader_errors():
    ds = tiny_dataset()
    with pytest.raises(UserError, match="batch size"):
        BatchLoader(ds, 0, shuffle=False)
    with pytest.raises(UserError, match="leaves no batches"):
        BatchLoader(ds, 50, shuffle=False, drop_last=True)
    with pytest.raises(UserError, match="resume at batch 9"):
        BatchLoader(ds, 4, shuffle=False).epoch(0, start_batch=9)


# ---- normalize and statistics ---------------------------------------------------------------------------

def test_normalize_and_channel_stats():
    ds = tiny_dataset(n=40)
    mean, std = channel_stats(ds)
    x = ds.images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False))
    out = normalize(ds.images, mean, std)
    assert out.dtype == torch.float32
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out.double(), manual, atol=1e-5)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (out.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    mean7, std7 = channel_stats(ds, chunk=7)  # chunking does not change the result
    assert torch.allclose(torch.tensor(mean7), torch.tensor(mean)) and torch.allclose(torch.tensor(std7),
                                                                                      torch.tensor(std))
    with pytest.raises(UserError, match="channels"):
        normalize(ds.images, (0.5, 0.5), (0.2, 0.2))


# ---- TrainAugment ----------------------------------------------------------------------------------------

def test_same_generator_state_gives_the_same_output():
    ds = tiny_dataset()
    mean, std = channel_stats(ds)
    for aug in (TrainAugment(mean, std, pad=2, flip=0.5), TrainAugment(mean, std, scale=(0.3, 1.0), flip=0.5)):
        g = torch.Generator().manual_seed(11)
        state = g.get_state()
        first = aug(ds.images, g)
        second_draw = aug(ds.images, g)
        g.set_state(state)
        assert torch.equal(aug(ds.images, g), first)
        assert not torch.equal(first, second_draw)


def test_flip_mirrors():
    ds = tiny_dataset()
    g = torch.Generator().manual_seed(0)
    out = TrainAugment((0.0,), (1.0,), flip=1.0)(ds.images, g)
    assert torch.allclose(out, ds.images.flip(-1).float() / 255)
    out = TrainAugment((0.0,), (1.0,), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)(ds.images, g)
    assert torch.allclose(out, ds.images.flip(-1).float() / 255, atol=1e-6)
    out = TrainAugment((0.0,), (1.0,), scale=(1.0, 1.0), ratio=(1.0, 1.0))(ds.images, g)
    assert torch.allclose(out, ds.images.float() / 255, atol=1e-6)  # full-image crop is the identity


def test_padded_crops_are_windows_of_the_padded_image():
    ds = tiny_dataset(n=12)
    pad = 2
    out = TrainAugment((0.0,), (1 / 255,), pad=pad, flip=0.5)(ds.images, torch.Generator().manual_seed(3))
    out = out.round()  # back to pixel values (x/255 divided by 1/255 is not exact in float32)
    padded = torch.nn.functional.pad(ds.images, (pad,) * 4).float()
    h, w = ds.images.shape[-2:]

    def window(i, dy, dx, flipped):
        win = padded[i, :, dy:dy + h, dx:dx + w]
        return win.flip(-1) if flipped else win

    offsets, flips = set(), 0
    for i in range(len(ds)):
        matches = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                   if torch.equal(out[i], window(i, dy, dx, f))]
        assert matches, f"sample {i} is not a window of its padded image"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 3 and 0 < flips < len(ds)  # the offsets and flips actually vary


def test_resized_crop_stays_inside_the_image():
    b, h, w = 64, 16, 16
    ramp = (torch.arange(w) * 16).to(torch.uint8).expand(b, 1, h, w)  # value = 16 · column
    aug = TrainAugment((0.0,), (1 / 255,), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    out = aug(ramp, torch.Generator().manual_seed(0))  # crops of 8x8 pixels, resized to 16x16
    assert out.shape == (b, 1, h, w)
    assert out.min() >= 0 and out.max() <= 16 * (w - 1)
    # output columns step by half an input pixel; columns 1..14 sample inside the image (no border clamping)
    span = out[:, 0, :, 14] - out[:, 0, :, 1]
    assert torch.allclose(span, torch.full_like(span, 16 * 13 * 0.5), atol=1e-3)
    assert out[:, 0, 0, 0].unique().numel() > 10  # the crop position varies
    small = TrainAugment((0.0,), (1.0,), scale=(0.5, 1.0), size=6)(ramp, torch.Generator().manual_seed(0))
    assert small.shape == (b, 1, 6, 6)


def test_augmented_output_is_roughly_normalized():
    ds = tiny_dataset(n=256, h=16, w=16)
    mean, std = channel_stats(ds)
    for aug in (TrainAugment(mean, std, flip=0.5), TrainAugment(mean, std, scale=(0.5, 1.0), flip=0.5),
                TrainAugment(mean, std, pad=1)):
        out = aug(ds.images, torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and out.shape == (256, 3, 16, 16)
        assert out.mean(dim=(0, 2, 3)).abs().max() < 0.15
        assert ((out.std(dim=(0, 2, 3)) - 1).abs().max()) < 0.35  # crops interpolate and pad, so loosely


def test_augment_errors():
    with pytest.raises(UserError, match="not both"):
        TrainAugment((0.5,), (0.2,), pad=4, scale=(0.5, 1.0))
    with pytest.raises(UserError, match="flip probability"):
        TrainAugment((0.5,), (0.2,), flip=1.5)
    with pytest.raises(UserError, match="scale range"):
        TrainAugment((0.5,), (0.2,), scale=(0.0, 1.0))


# ---- EvalTransform ---------------------------------------------------------------------------------------

def test_eval_transform_normalizes_and_resizes():
    ds = tiny_dataset(h=8, w=12)
    mean, std = channel_stats(ds)
    assert torch.equal(EvalTransform(mean, std)(ds.images), normalize(ds.images, mean, std))
    out = EvalTransform(mean, std, size=4)(ds.images)
    assert out.shape == (23, 3, 4, 4)
    band = torch.zeros(1, 1, 4, 8, dtype=torch.uint8)
    band[..., 2:6] = 255
    assert resize_center_crop(band, 4).eq(255).all()  # shorter side kept, center 4 columns cropped
    assert torch.equal(resize_center_crop(ds.images[:, :, :8, :8], 8), ds.images[:, :, :8, :8])
