"""Image classification datasets, decoded once into uint8 tensors held in memory.

Sources accepted by `load_image_split`:
  - `"digits"`: scikit-learn's 1,797 handwritten digits (8x8 grayscale), embedded, no download.
  - a name given to `register_image_source` (your own images, from Python);
  - a directory, either with `train/` and `test/` (or `val/` when there is no `test/`) folders, each holding
    one folder per class, or holding the class folders directly (then split deterministically, stratified
    by class, by `test_fraction` and `seed`);
  - a `.tar`, `.tar.gz` or `.tgz` archive of such a directory, possibly inside one top-level folder, read by
    streaming (nothing is extracted to disk).
Image files are `.jpg .jpeg .png .bmp .webp` (any case); other files and hidden files are ignored.

Images are decoded with Pillow to RGB, or to one channel (L) when every image is grayscale. Images of
different sizes need `image_size`: each is then resized (bilinear, antialiased) so its shorter side is
`image_size` and center-cropped to `image_size` x `image_size`.

Decoded splits of a directory or archive are cached (`$POLYATTN_CACHE` or `~/.cache/polyattn`) under a key
made of the source's absolute path, size and modification time (for a directory: of every file in it), the
image size, the split parameters and a format version. One pass over the source decodes and caches both
splits, so an archive is read once even though a gzip stream cannot seek.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import UserError, nearest
from ..files import atomic_write, default_cache_dir
from .transforms import resize_center_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLITS = ("train", "test")
CACHE_FORMAT_VERSION = 1
MAX_IMAGE_BYTES = 256 << 20
"""Largest image file read (a larger one is refused, not read into memory)."""

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_SPLIT_DIRS = ("train", "test", "val")


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    source: str  # what it was loaded from, for the run config

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_REGISTERED: dict[str, Callable[[str], ImageDataset]] = {}


def register_image_source(name: str, load: Callable[[str], ImageDataset]) -> None:
    """Makes `data.source=NAME` read your own images from Python: `load(split)` returns the `ImageDataset` of
    "train" or "test" (uint8 `[N, C, H, W]` images, int64 labels, class names). Every command of this process
    then accepts the name, e.g. `train(build_config("default", ["data.source=NAME"]))`; a run trained on it
    records the name, so evaluating it later needs the same registration (see examples/custom_dataset.py)."""
    if name == "digits" or Path(name).suffix or "/" in name:
        raise UserError(f"'{name}' cannot name a registered image source: it is 'digits' or looks like a path.")
    _REGISTERED[name] = load


def load_image_split(source: str, split: str, *, image_size: int | None = None, test_fraction: float = 0.2,
                     seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True) -> ImageDataset:
    """The `split` ("train" or "test") of the image dataset at `source` (see the module docstring); `progress`
    shows a bar while a source is decoded and cached (the first time only)."""
    if split not in SPLITS:
        raise UserError(f"Unknown split '{split}'; use 'train' or 'test'.{nearest(split, SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"The test fraction must be between 0 and 1 (exclusive), got {test_fraction}.")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"data.image_size must be a positive number of pixels, got {image_size!r}.")
    if source == "digits":
        return _load_digits(split, image_size, test_fraction, seed)
    if source in _REGISTERED:
        dataset = _REGISTERED[source](split)
        if image_size is not None and dataset.images.shape[-2:] != (image_size, image_size):
            dataset = ImageDataset(resize_center_crop(dataset.images, image_size), dataset.labels, dataset.classes,
                                   dataset.source)
        return dataset

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"The image source '{source}' does not exist; give a directory of class folders, "
                        f"a .tar/.tar.gz archive of one, or 'digits'.")
    path = path.resolve()
    if path.is_dir():
        files = _list_directory(path)
        fingerprint = [[f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns] for f, st in files]
        read = lambda: _read_directory(path, [f for f, _ in files])
        count = len(files)
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        if not path.is_file():
            raise UserError(f"The image archive '{source}' is not a regular file (a device or FIFO can be endless); "
                            f"copy it into a file and pass that.")
        st = path.stat()
        fingerprint = [st.st_size, st.st_mtime_ns]
        read = lambda: _read_archive(path)
        count = None  # a gzip stream has no index: the bar counts without a total
    else:
        raise UserError(f"'{source}' is not a supported image source; give a directory of class folders, "
                        f"a .tar, .tar.gz or .tgz archive of one, or 'digits'.")

    key_fields = [CACHE_FORMAT_VERSION, str(path), fingerprint, image_size, test_fraction, seed]
    key = hashlib.sha256(json.dumps(key_fields).encode()).hexdigest()[:32]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache / "images"
    cached = _read_cache(cache / f"{key}-{split}.pt")
    if cached is not None:
        return cached
    from ..progress import note, progress_bar

    with progress_bar(read(), total=count, desc=f"decoding {path.name} (once, then cached)", unit="img",
                      enabled=progress) as entries:
        splits = _decode_source(entries, str(path), image_size, test_fraction, seed)
    for name, dataset in splits.items():
        _write_cache(cache / f"{key}-{name}.pt", dataset)
    if progress:
        note(f"decoded {sum(len(d) for d in splits.values()):,} images of {path.name}; cached under {cache}")
    return splits[split]


# ---- the embedded default ------------------------------------------------------------------------------

def _load_digits(split: str, image_size: int | None, test_fraction: float, seed: int) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("The 'digits' dataset needs scikit-learn; install it with "
                        "pip install 'polyattn[vision]'.") from None
    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8))
    images = images[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    images, labels = images[idx], labels[idx]
    if image_size is not None:
        images = resize_center_crop(images, image_size)
    return ImageDataset(images.contiguous(), labels, [str(c) for c in range(10)], "digits")


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, test) indices: from each class, round(n_c · test_fraction) random samples go to test.

    A pure function of (labels, test_fraction, seed).
    """
    g = torch.Generator().manual_seed(seed)
    test = []
    for c in torch.unique(labels).tolist():  # sorted
        members = torch.nonzero(labels == c).flatten()
        n_test = round(len(members) * test_fraction)
        test.append(members[torch.randperm(len(members), generator=g)[:n_test]])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    if test:
        is_test[torch.cat(test)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


# ---- reading files ---------------------------------------------------------------------------------------

def _is_image_name(parts: tuple[str, ...]) -> bool:
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def _list_directory(root: Path) -> list[tuple[Path, os.stat_result]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if _is_image_name(f.relative_to(root).parts):
                st = f.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise UserError(f"'{f}' is not a regular file (a device or FIFO can be endless); remove it or "
                                    f"replace it with the image file.")
                files.append((f, st))
    return files


class CappedReader(io.RawIOBase):
    """A binary reader that ends after `limit` bytes of `raw`, so a source that grows while it is read (or a
    decompression bomb) cannot make a reader run forever: silently, or with `too_long()` raised when `raw`
    holds more."""

    def __init__(self, raw, limit: int, too_long=None):
        self.raw, self.left, self.too_long = raw, limit, too_long

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            if self.too_long is not None and self.raw.read(1):
                raise self.too_long()
            return 0
        n = self.raw.readinto(memoryview(buffer)[: self.left])
        self.left -= n
        return n


def _check_image_size(name: str, size: int) -> None:
    if size > MAX_IMAGE_BYTES:
        raise UserError(f"The image '{name}' is {size / 2**20:.0f} MiB, more than the {MAX_IMAGE_BYTES >> 20} MiB "
                        f"an image file may have; remove it or shrink it.")


def _read_directory(root: Path, files: list[Path]) -> Iterator[tuple[tuple[str, ...], str, bytes]]:
    for f in files:
        _check_image_size(str(f), f.stat().st_size)
        try:
            data = f.read_bytes()
        except OSError as e:
            raise UserError(f"Cannot read the image file '{f}' ({e.strerror}); check its permissions.") from None
        yield f.relative_to(root).parts, str(f), data


def _read_archive(path: Path) -> Iterator[tuple[tuple[str, ...], str, bytes]]:
    try:
        # read the archive only up to its size when opened: one that keeps growing cannot keep the read going
        with open(path, "rb") as raw, tarfile.open(fileobj=io.BufferedReader(CappedReader(raw, path.stat().st_size)),
                                                   mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in (".", "/"))
                if not _is_image_name(parts):
                    continue
                _check_image_size(f"{path.name}:{member.name}", member.size)
                data = tar.extractfile(member).read()
                yield parts, f"{path.name}:{member.name}", data
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"Cannot read the archive '{path}' ({e}); check that it is a complete .tar, .tar.gz "
                        f"or .tgz file.") from None


def _decode(data: bytes, name: str, image_size: int | None) -> np.ndarray:
    """(H, W) uint8 for a grayscale image, (H, W, 3) otherwise."""
    from PIL import Image  # the vision extra

    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = "L" if im.mode in _GRAY_MODES else "RGB"
            im.load()
            if im.mode != mode:
                im = im.convert(mode)
            if image_size is not None and im.size != (image_size, image_size):
                w, h = im.size
                scale = image_size / min(w, h)
                new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
                left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            return np.asarray(im)
    except Image.UnidentifiedImageError:
        raise UserError(f"Cannot decode the image '{name}' (not an image file Pillow can read); remove or "
                        f"replace the file.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"Cannot decode the image '{name}' ({e}); remove or replace the file.") from None


# ---- from files to splits --------------------------------------------------------------------------------

def _decode_source(entries: Iterator[tuple[tuple[str, ...], str, bytes]], source: str, image_size: int | None,
                   test_fraction: float, seed: int) -> dict[str, ImageDataset]:
    try:
        import PIL  # noqa: F401  (the vision extra)
    except ImportError:
        msg = "Decoding image files needs Pillow; install it with pip install 'polyattn[vision]'."
        raise UserError(msg) from None
    records = []  # (parts, display name, array)
    first = None  # (display name, shape) of the first image, for the size check
    for parts, name, data in entries:
        array = _decode(data, name, image_size)
        if first is None:
            first = (name, array.shape[:2])
        elif array.shape[:2] != first[1]:
            (h0, w0), (h1, w1) = first[1], array.shape[:2]
            raise UserError(f"Images differ in size: '{first[0]}' is {w0}x{h0} but '{name}' is {w1}x{h1}; set "
                            f"data.image_size=<pixels> to resize them all to one square size.")
        records.append((parts, name, array))
    if not records:
        raise UserError(f"No images were found in '{source}'; it should hold class folders of "
                        f"{', '.join(IMAGE_EXTENSIONS)} files (directly or under train/ and test/).")
    records.sort(key=lambda r: r[0])

    split_of, class_of = _resolve_layout([r[0] for r in records], [r[1] for r in records])
    keep = [s != "skip" for s in split_of]  # val/ beside test/ is a validation split we do not use
    records = [r for r, k in zip(records, keep) if k]
    split_of = [s for s, k in zip(split_of, keep) if k]
    class_of = [c for c, k in zip(class_of, keep) if k]
    gray = all(r[2].ndim == 2 for r in records)
    arrays = [r[2] if gray or r[2].ndim == 3 else np.repeat(r[2][:, :, None], 3, axis=2) for r in records]
    images = torch.from_numpy(np.stack(arrays))
    images = images[:, None] if gray else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    del arrays, records

    classes = sorted({c for s, c in zip(split_of, class_of) if s in ("train", None)})
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[c] for c in class_of], dtype=torch.int64)
    if all(s is None for s in split_of):
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    else:
        which = torch.tensor([s == "train" for s in split_of])
        train_idx, test_idx = torch.nonzero(which).flatten(), torch.nonzero(~which).flatten()
    return {name: ImageDataset(images[idx].contiguous(), labels[idx], classes, source)
            for name, idx in (("train", train_idx), ("test", test_idx))}


def _resolve_layout(paths: list[tuple[str, ...]], names: list[str]) -> tuple[list[str | None], list[str]]:
    """For each image path (a tuple of parts): its split ("train"/"test"; None when the source is to be split;
    "skip" for val/ beside test/) and its class folder. Images outside a class folder, or in a test class that
    has no training images, raise.
    """
    tops = {p[0] for p in paths}
    if len(tops) == 1 and tops.isdisjoint(_SPLIT_DIRS) and all(len(p) >= 3 for p in paths):
        paths = [p[1:] for p in paths]  # one top-level folder around the dataset
        tops = {p[0] for p in paths}
    has_train, test_dir = "train" in tops, "test" if "test" in tops else "val" if "val" in tops else None
    if has_train != (test_dir is not None):
        present = "train/" if has_train else f"{test_dir}/"
        raise UserError(f"The image source has {present} but not its partner (train/ with test/ or val/); add "
                        f"the missing split folder, or put the class folders directly in the source to split "
                        f"it automatically.")

    split_of: list[str | None] = []
    class_of: list[str] = []
    for p, name in zip(paths, names):
        if has_train:
            if p[0] not in ("train", test_dir):
                if p[0] in _SPLIT_DIRS:  # val/ beside test/
                    split_of.append("skip")
                    class_of.append("")
                    continue
                raise UserError(f"The image '{name}' is outside train/ and {test_dir}/; move it into a class "
                                f"folder of one of them, or remove it.")
            split, p = ("train" if p[0] == "train" else "test"), p[1:]
        else:
            split = None
        if len(p) < 2:
            raise UserError(f"The image '{name}' is not inside a class folder; put every image in a folder "
                            f"named after its class.")
        split_of.append(split)
        class_of.append(p[0])

    if has_train:
        train_classes = {c for s, c in zip(split_of, class_of) if s == "train"}
        for s, c, name in zip(split_of, class_of, names):
            if s == "test" and c not in train_classes:
                raise UserError(f"The test image '{name}' is in class '{c}', which has no training images; add "
                                f"training images of that class or remove its test folder.")
    return split_of, class_of


# ---- the cache -------------------------------------------------------------------------------------------

def _read_cache(file: Path) -> ImageDataset | None:
    """The cached split, or None when absent or unreadable (then it is rebuilt and overwritten)."""
    if not file.is_file():
        return None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
        if obj.get("version") != CACHE_FORMAT_VERSION:
            return None
        images, labels = obj["images"], obj["labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
            return None
        return ImageDataset(images, labels, list(obj["classes"]), str(obj["source"]))
    except Exception:  # any corruption (truncated zip, bad pickle, wrong types) means: rebuild
        return None


def _write_cache(file: Path, dataset: ImageDataset) -> None:
    """Writes atomically (a temporary file renamed into place); a cache that cannot be written only warns."""
    obj = {"version": CACHE_FORMAT_VERSION, "images": dataset.images, "labels": dataset.labels,
           "classes": list(dataset.classes), "source": dataset.source}
    try:
        atomic_write(file, lambda f: torch.save(obj, f))
    except OSError as e:
        warnings.warn(f"Could not write the dataset cache {file} ({e}); the next load will decode again.",
                      stacklevel=3)
