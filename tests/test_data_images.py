"""Image datasets: the embedded digits, image folders, tar archives, the decode cache and the error messages."""

import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from polyattn.data import images as images_mod  # noqa: E402
from polyattn.data.images import ImageDataset, load_image_split, stratified_split  # noqa: E402
from polyattn.errors import UserError  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def write_image(path: Path, value: int, size=(6, 6), mode="RGB", ext=".png") -> Path:
    """A constant image whose first channel is `value` (so tests can tell images apart after decoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "L":
        array = np.full((h, w), value, np.uint8)
    else:
        array = np.stack([np.full((h, w), value, np.uint8), np.full((h, w), 7, np.uint8),
                          np.full((h, w), 200, np.uint8)], axis=-1)
    file = path.with_suffix(ext)
    Image.fromarray(array, mode).save(file)
    return file


def make_flat(root: Path, per_class=(5, 5, 5), **kw) -> dict[int, str]:
    """Class folders c0, c1, ... directly in `root`; returns {pixel value: class name}."""
    owner, value = {}, 1
    for c, n in enumerate(per_class):
        for i in range(n):
            write_image(root / f"c{c}" / f"{i:03d}", value, **kw)
            owner[value] = f"c{c}"
            value += 1
    return owner


def make_split_layout(root: Path, test_dir="test") -> None:
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            write_image(root / "train" / name / f"{i}", 10 * c + i)
        for i in range(2):
            write_image(root / test_dir / name / f"{i}", 100 + 10 * c + i)


def first_values(ds: ImageDataset) -> list[int]:
    return ds.images[:, 0, 0, 0].tolist()


def test_digits_split_is_stratified_and_deterministic():
    pytest.importorskip("sklearn")
    train = load_image_split("digits", "train")
    test = load_image_split("digits", "test")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797 and train.classes == [str(i) for i in range(10)]
    assert train.images.max() == 255 and train.images.min() == 0
    per_class = torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10)
    assert torch.equal(torch.bincount(test.labels, minlength=10), (per_class.double() * 0.2).round().long())
    again = load_image_split("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    other = load_image_split("digits", "test", seed=1)
    assert not torch.equal(other.images, test.images)
    big = load_image_split("digits", "train", image_size=16)
    assert big.images.shape == (len(train), 1, 16, 16) and big.images.dtype == torch.uint8


def test_stratified_split_partitions_the_indices():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, test = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(16))
    assert torch.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert torch.equal(stratified_split(labels, 0.2, seed=3)[1], test)


def test_split_layout_directory(tmp_path):
    make_split_layout(tmp_path / "data")
    train = load_image_split(str(tmp_path / "data"), "train", cache_dir=tmp_path / "cache")
    test = load_image_split(str(tmp_path / "data"), "test", cache_dir=tmp_path / "cache")
    assert train.classes == test.classes == ["cat", "dog"]
    assert train.images.shape == (6, 3, 6, 6) and test.images.shape == (4, 3, 6, 6)
    assert first_values(train) == [0, 1, 2, 10, 11, 12] and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert first_values(test) == [100, 101, 110, 111] and test.labels.tolist() == [0, 0, 1, 1]
    assert train.images[:, 1].eq(7).all() and train.images[:, 2].eq(200).all()
    assert train.source == str((tmp_path / "data").resolve())


def test_val_is_a_synonym_for_test(tmp_path):
    make_split_layout(tmp_path / "data", test_dir="val")
    test = load_image_split(str(tmp_path / "data"), "test", cache_dir=tmp_path / "cache")
    assert first_values(test) == [100, 101, 110, 111]


def test_class_missing_from_test_is_fine_but_unknown_test_class_is_an_error(tmp_path):
    write_image(tmp_path / "a" / "train" / "x" / "0", 1)
    write_image(tmp_path / "a" / "train" / "y" / "0", 2)
    write_image(tmp_path / "a" / "test" / "y" / "0", 3)
    test = load_image_split(str(tmp_path / "a"), "test", cache_dir=tmp_path / "cache")
    assert test.classes == ["x", "y"] and test.labels.tolist() == [1]
    write_image(tmp_path / "a" / "test" / "z" / "0", 4)
    with pytest.raises(UserError, match=r"class 'z'.*no training images"):
        load_image_split(str(tmp_path / "a"), "test", cache_dir=tmp_path / "cache")


def test_flat_directory_is_split_stratified(tmp_path):
    owner = make_flat(tmp_path / "flat", per_class=(10, 5, 5))
    kw = dict(cache_dir=tmp_path / "cache", test_fraction=0.2, seed=4)
    train = load_image_split(str(tmp_path / "flat"), "train", **kw)
    test = load_image_split(str(tmp_path / "flat"), "test", **kw)
    assert train.classes == ["c0", "c1", "c2"]
    values = first_values(train) + first_values(test)
    assert sorted(values) == sorted(owner)  # a partition of all images
    assert torch.bincount(test.labels, minlength=3).tolist() == [2, 1, 1]
    for ds in (train, test):
        assert [owner[v] for v in first_values(ds)] == [ds.classes[i] for i in ds.labels.tolist()]
    other = load_image_split(str(tmp_path / "flat"), "test", cache_dir=tmp_path / "cache", seed=5)
    assert sorted(first_values(other)) != sorted(first_values(test))


def test_extensions_are_case_insensitive_and_other_files_ignored(tmp_path):
    write_image(tmp_path / "d" / "a" / "0", 1, ext=".PNG")
    write_image(tmp_path / "d" / "a" / "1", 2, ext=".bmp")
    write_image(tmp_path / "d" / "b" / "0", 3, ext=".jpg")
    write_image(tmp_path / "d" / "b" / "1", 4, ext=".WebP")
    (tmp_path / "d" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / "b" / ".hidden.png").write_bytes(b"junk")
    kw = dict(cache_dir=tmp_path / "cache", test_fraction=0.5)
    n = len(load_image_split(str(tmp_path / "d"), "train", **kw)) + len(load_image_split(str(tmp_path / "d"),
                                                                                         "test", **kw))
    assert n == 4


def test_grayscale_gives_one_channel_and_mixed_gives_rgb(tmp_path):
    for i in range(2):
        write_image(tmp_path / "g" / "a" / f"{i}", 50 + i, mode="L")
        write_image(tmp_path / "g" / "b" / f"{i}", 60 + i, mode="L")
    kw = dict(cache_dir=tmp_path / "cache", test_fraction=0.5)
    ds = load_image_split(str(tmp_path / "g"), "train", **kw)
    assert ds.images.shape[1] == 1
    write_image(tmp_path / "g" / "b" / "2", 70)  # one colour image
    images = torch.cat([load_image_split(str(tmp_path / "g"), s, **kw).images for s in ("train", "test")])
    assert images.shape == (5, 3, 6, 6)
    gray = images[images[:, 1, 0, 0] != 7]  # grayscale images repeat their value in every channel
    assert len(gray) == 4 and gray.eq(gray[:, :1]).all()


def test_sizes_must_agree_unless_image_size_is_given(tmp_path):
    write_image(tmp_path / "s" / "a" / "0", 1, size=(6, 6))
    write_image(tmp_path / "s" / "a" / "1", 2, size=(6, 6))
    write_image(tmp_path / "s" / "b" / "0", 3, size=(10, 8))
    write_image(tmp_path / "s" / "b" / "1", 4, size=(6, 6))
    with pytest.raises(UserError, match=r"6x6.*10x8.*data\.image_size"):
        load_image_split(str(tmp_path / "s"), "train", cache_dir=tmp_path / "cache", test_fraction=0.5)
    ds = load_image_split(str(tmp_path / "s"), "train", image_size=4, cache_dir=tmp_path / "cache",
                          test_fraction=0.5)
    assert ds.images.shape[1:] == (3, 4, 4)


def test_resize_is_shorter_side_then_center_crop(tmp_path):
    array = np.zeros((4, 8, 3), np.uint8)
    array[:, 2:6] = 255  # a white band in the middle 4 columns
    for c in ("a", "b"):
        for i in range(2):
            (tmp_path / "r" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "r" / c / f"{i}.png")
    ds = load_image_split(str(tmp_path / "r"), "train", image_size=4, cache_dir=tmp_path / "c", test_fraction=0.5)
    assert ds.images.shape[1:] == (3, 4, 4)
    assert ds.images.eq(255).all()  # the center 4x4 crop is the white band


def test_image_size_upsamples_an_archive_of_small_images(tmp_path):
    # vision_fine's 64 px rows: CIFAR-10's 32 px JPEGs upsampled 2x (bilinear) when the archive is decoded
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    for n, (c, i) in enumerate([("a", 0), ("a", 1), ("b", 0), ("b", 1)]):
        # smooth images (gradients), which bilinear upsampling keeps: a 2x2 block averages to its source pixel
        array = np.stack([10 + 15 * n + 40 * rows + 20 * cols + 5 * ch for ch in range(3)], -1).astype(np.uint8)
        (tmp_path / "small" / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "small" / c / f"{i}.png")
    archive = make_tar(tmp_path / "small", tmp_path / "small.tar.gz", "top", "w:gz")
    native = load_image_split(str(archive), "train", cache_dir=tmp_path / "c", test_fraction=0.5)
    big = load_image_split(str(archive), "train", image_size=8, cache_dir=tmp_path / "c", test_fraction=0.5)
    assert native.images.shape[1:] == (3, 4, 4) and big.images.shape[1:] == (3, 8, 8)
    assert torch.equal(native.labels, big.labels)
    for small, large in zip(native.images, big.images, strict=True):
        # each 2x2 block averages to its source pixel (up to the clamped border), and it is interpolated, not
        # repeated (nearest-neighbour upsampling would give four equal pixels)
        pooled = torch.nn.functional.avg_pool2d(large[None].float(), 2)[0]
        assert (pooled - small.float()).abs().max() <= 9
        assert not torch.equal(large[:, ::2, ::2], large[:, 1::2, 1::2])


def make_tar(src: Path, archive: Path, top: str | None, mode: str) -> Path:
    with tarfile.open(archive, mode) as tar:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                rel = f.relative_to(src).as_posix()
                tar.add(f, arcname=f"{top}/{rel}" if top else rel)
    return archive


@pytest.mark.parametrize(("name", "mode", "top"), [("d.tar.gz", "w:gz", "cifarish"), ("d.tar", "w", None),
                                                   ("d.tgz", "w:gz", None)])
def test_archive_equals_directory(tmp_path, name, mode, top):
    make_split_layout(tmp_path / "data")
    archive = make_tar(tmp_path / "data", tmp_path / name, top, mode)
    for split in ("train", "test"):
        from_dir = load_image_split(str(tmp_path / "data"), split, cache_dir=tmp_path / "c1")
        from_tar = load_image_split(str(archive), split, cache_dir=tmp_path / "c2")
        assert torch.equal(from_dir.images, from_tar.images) and torch.equal(from_dir.labels, from_tar.labels)
        assert from_dir.classes == from_tar.classes


def test_flat_archive_in_a_top_folder(tmp_path):
    owner = make_flat(tmp_path / "flat", per_class=(4, 4))
    archive = make_tar(tmp_path / "flat", tmp_path / "flat.tar.gz", "top", "w:gz")
    kw = dict(cache_dir=tmp_path / "cache", test_fraction=0.25)
    train, test = (load_image_split(str(archive), s, **kw) for s in ("train", "test"))
    assert train.classes == ["c0", "c1"] and len(train) == 6 and len(test) == 2
    assert sorted(first_values(train) + first_values(test)) == sorted(owner)


def test_one_archive_read_serves_both_splits_and_the_cache_is_used(tmp_path, monkeypatch):
    make_split_layout(tmp_path / "data")
    archive = make_tar(tmp_path / "data", tmp_path / "d.tar.gz", None, "w:gz")
    reads = []
    real = images_mod._read_archive
    monkeypatch.setattr(images_mod, "_read_archive", lambda p: (reads.append(p), real(p))[1])
    train = load_image_split(str(archive), "train", cache_dir=tmp_path / "cache")
    test = load_image_split(str(archive), "test", cache_dir=tmp_path / "cache")
    train2 = load_image_split(str(archive), "train", cache_dir=tmp_path / "cache")
    assert len(reads) == 1
    assert len(train) == 6 and len(test) == 4 and torch.equal(train.images, train2.images)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)  # no temporary file left behind


def test_cache_key_follows_the_files_and_env(tmp_path, monkeypatch):
    make_flat(tmp_path / "flat", per_class=(3, 3))
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "envcache"))
    first = load_image_split(str(tmp_path / "flat"), "train", test_fraction=0.34)
    assert any((tmp_path / "envcache").rglob("*.pt"))
    file = tmp_path / "flat" / "c0" / "000.png"
    write_image(file.with_suffix(""), 222)
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))
    values = [v for s in ("train", "test") for v in first_values(load_image_split(str(tmp_path / "flat"), s,
                                                                                   test_fraction=0.34))]
    assert 222 in values and 1 not in values  # the edited file was decoded again, not taken from the cache
    assert len(first) == 4
    different_size = load_image_split(str(tmp_path / "flat"), "train", test_fraction=0.34, image_size=3)
    assert different_size.images.shape[-1] == 3


def test_corrupted_cache_is_rebuilt(tmp_path):
    make_split_layout(tmp_path / "data")
    first = load_image_split(str(tmp_path / "data"), "train", cache_dir=tmp_path / "cache")
    for f in (tmp_path / "cache").rglob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    again = load_image_split(str(tmp_path / "data"), "train", cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, again.images)
    third = load_image_split(str(tmp_path / "data"), "train", cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, third.images)


def test_unwritable_cache_only_warns(tmp_path):
    make_split_layout(tmp_path / "data")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should go")
    with pytest.warns(UserWarning, match="cache"):
        ds = load_image_split(str(tmp_path / "data"), "train", cache_dir=blocker)
    assert len(ds) == 6


@pytest.mark.parametrize(("setup", "source", "split", "pattern"), [
    (None, "nowhere", "train", "does not exist"),
    ("empty", "empty", "train", "No images were found"),
    ("zip", "data.zip", "train", "not a supported image source"),
    ("split", "data", "validation", "Unknown split 'validation'"),
    ("corrupt", "data", "train", r"Cannot decode the image '.*broken\.jpg'"),
    ("train_only", "data", "train", "not its partner"),
    ("loose", "data", "train", "not inside a class folder"),
    ("badtar", "bad.tar.gz", "train", "Cannot read the archive"),
    ("emptytar", "empty.tar", "train", "No images were found"),
])
def test_errors_are_user_errors(tmp_path, setup, source, split, pattern):
    if setup == "empty":
        (tmp_path / "empty" / "a").mkdir(parents=True)
    elif setup == "zip":
        (tmp_path / "data.zip").write_bytes(b"PK")
    elif setup == "split":
        make_split_layout(tmp_path / "data")
    elif setup == "corrupt":
        make_flat(tmp_path / "data", per_class=(2, 2))
        (tmp_path / "data" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    elif setup == "train_only":
        write_image(tmp_path / "data" / "train" / "a" / "0", 1)
    elif setup == "loose":
        make_flat(tmp_path / "data", per_class=(2, 2))
        write_image(tmp_path / "data" / "stray", 9)
    elif setup == "badtar":
        (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    elif setup == "emptytar":
        (tmp_path / "readme.txt").write_text("hello")
        with tarfile.open(tmp_path / "empty.tar", "w") as tar:
            tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    with pytest.raises(UserError, match=pattern) as info:
        load_image_split(str(tmp_path / source), split, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_bad_parameters_are_user_errors():
    with pytest.raises(UserError, match="test fraction"):
        load_image_split("digits", "train", test_fraction=1.0)
    with pytest.raises(UserError, match="image_size"):
        load_image_split("digits", "train", image_size=0)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.exists(), reason="shared CIFAR-10 archive not present")
def test_cifar10_archive(tmp_path):
    train = load_image_split(str(CIFAR), "train", cache_dir=tmp_path)
    test = load_image_split(str(CIFAR), "test", cache_dir=tmp_path)
    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert len(train.classes) == 10 and train.classes == test.classes and "airplane" in train.classes
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert 0.3 < train.images[:1000].float().mean().item() / 255 < 0.7
