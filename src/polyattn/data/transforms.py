"""Batch transforms on uint8 image tensors `[B, C, H, W]`: normalization, training augmentation, evaluation.

They run in the training process on whole batches (no per-image Python loop). Every random draw comes from
a `torch.Generator` that the caller owns and passes in, so saving its state (`generator.get_state()`) in a
checkpoint makes a resumed run augment exactly as the uninterrupted one would have. The generator is a CPU
generator; the draws are moved to the images' device.

Mean and std are in the units of pixel/255 (as in torchvision), one value per channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError


def _per_channel(values: Sequence[float] | torch.Tensor, channels: int, what: str, device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise UserError(f"The normalization {what} has {t.numel()} values but the images have {channels} "
                        f"channels; give one {what} per channel.")
    return t.view(1, channels, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 (or float in 0..255) `[B, C, H, W]` → float32 `(x/255 − mean) / std`."""
    c = images.shape[1]
    mean_t = _per_channel(mean, c, "mean", images.device)
    std_t = _per_channel(std, c, "std", images.device)
    return (images.float() / 255.0 - mean_t) / std_t


def channel_stats(dataset, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of `dataset.images` (uint8 `[N, C, H, W]`) in pixel/255 units.

    Computed in float64 over chunks of `chunk` images, so a large dataset needs no float copy of itself.
    Use it on the training split and pass the result to both the training and evaluation transforms.
    """
    images = dataset.images
    if images.shape[0] == 0:
        raise UserError("Cannot compute channel statistics of an empty dataset; check the data source.")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64) / 255.0  # (b, C, H, W)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0.0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes the shorter side to `size` (bilinear, antialiased) and center-crops to `size` x `size`.

    Keeps the dtype: uint8 input is rounded and clamped back to uint8. A batch already `size` x `size`
    is returned unchanged.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size]
    if images.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(images.dtype)


class TrainAugment:
    """Random crop and horizontal flip of a uint8 batch, then normalization to float32.

    Two crops, chosen by the arguments:
      - `pad > 0`: CIFAR-style; zero-pad by `pad` pixels on each side and take a random crop of the original
        size (offsets uniform in [0, 2·pad] per sample).
      - `scale=(lo, hi)`: random-resized crop (Inception style, arXiv 1409.4842): per sample an area fraction
        in [lo, hi] and a log-uniform aspect ratio in `ratio`, the crop sides clamped to the image, resized
        bilinearly to `size` (default: the input size) with one `grid_sample` over the batch.
    With neither, only flip and normalization. `flip` is the probability of mirroring left-right; leave it
    0 for data that is not mirror-symmetric (handwritten digits).

    Draw order from the generator, per call: crop offsets (rows, then columns) or crop parameters (area,
    ratio, x, y), then the flip coins.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, pad: int = 0,
                 scale: tuple[float, float] | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: float = 0.0, size: int | None = None):
        if pad < 0:
            raise UserError(f"The crop padding must be a number of pixels >= 0, got {pad}.")
        if pad and scale is not None:
            raise UserError("Choose either padded random crops (pad) or random-resized crops (scale), not both.")
        if scale is not None and not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise UserError(f"The crop scale range must satisfy 0 < lo <= hi <= 1, got {tuple(scale)}.")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise UserError(f"The crop aspect-ratio range must satisfy 0 < lo <= hi, got {tuple(ratio)}.")
        if not 0.0 <= flip <= 1.0:
            raise UserError(f"The flip probability must be in [0, 1], got {flip}.")
        if size is not None and scale is None:
            raise UserError("An output size for augmentation needs random-resized crops; set scale=(lo, hi) "
                            "or resize the dataset with data.image_size instead.")
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad, self.scale, self.ratio, self.flip, self.size = pad, scale, ratio, flip, size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.scale is not None:
            x = self._resized_crop(images, generator)
        else:
            x = self._pad_crop_flip(images, generator)
        return normalize(x, self.mean, self.std)

    def _flips(self, b: int, generator: torch.Generator) -> torch.Tensor:
        if self.flip == 0.0:
            return torch.zeros(b, dtype=torch.bool)
        return torch.rand(b, generator=generator) < self.flip

    def _pad_crop_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.pad
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        flip = self._flips(b, generator)
        if p == 0 and not flip.any():
            return images
        rows = top[:, None] + torch.arange(h)  # (B, H) indices into the padded image
        cols = left[:, None] + torch.arange(w)  # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        dev = images.device
        padded = F.pad(images, (p, p, p, p)) if p else images  # (B, C, H+2p, W+2p), zeros outside
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        ci = torch.arange(c, device=dev).view(1, c, 1, 1)
        return padded[bi, ci, rows.to(dev).view(b, 1, h, 1), cols.to(dev).view(b, 1, 1, w)]

    def _resized_crop(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        out_h, out_w = (self.size, self.size) if self.size is not None else (h, w)
        lo, hi = self.scale
        area = lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * torch.rand(
            b, generator=generator, dtype=torch.float64)
        r = log_r.exp()
        # crop sides as fractions of the image sides; aspect ratio is in pixels, so correct for h != w
        fw = (area * r * h / w).sqrt().clamp(max=1.0)
        fh = (area / r * w / h).sqrt().clamp(max=1.0)
        x0 = torch.rand(b, generator=generator, dtype=torch.float64) * (1.0 - fw)
        y0 = torch.rand(b, generator=generator, dtype=torch.float64) * (1.0 - fh)
        flip = self._flips(b, generator)
        sign = 1.0 - 2.0 * flip.double()
        # affine map from output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False)
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = fw * sign
        theta[:, 0, 2] = 2.0 * x0 + fw - 1.0
        theta[:, 1, 1] = fh
        theta[:, 1, 2] = 2.0 * y0 + fh - 1.0
        x = images.float()
        grid = F.affine_grid(theta.to(x), [b, images.shape[1], out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class EvalTransform:
    """Normalization for evaluation, after an optional shorter-side resize and center crop to `size`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, size: int | None = None):
        if size is not None and size < 1:
            raise UserError(f"The evaluation image size must be a positive number of pixels, got {size}.")
        self.mean, self.std, self.size = tuple(mean), tuple(std), size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            images = resize_center_crop(images, self.size)
        return normalize(images, self.mean, self.std)
