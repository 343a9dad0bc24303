"""Batch transforms on uint8 image tensors `[B, C, H, W]`: normalization, training augmentation, evaluation.

They run in the training process on whole batches (no per-image Python loop). Every random draw comes from
a `torch.Generator` that the caller owns and passes in, so saving its state (`generator.get_state()`) in a
checkpoint makes a resumed run augment exactly as the uninterrupted one would have. The generator is a CPU
generator; the draws are moved to the images' device. Operations taken from kornia (RandAugment, random
erasing), which sample from torch's global RNG, run inside `generator_as_global_rng`, so their draws come
from the same generator too.

Training pipeline (`TrainAugment`, then `MixupCutmix`), in the order of DeiT (arXiv 2012.12877): crop and
flip → RandAugment → normalization → random erasing → mixup or cutmix of the batch with soft targets.

Mean and std are in the units of pixel/255 (as in torchvision), one value per channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
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


@contextmanager
def generator_as_global_rng(generator: torch.Generator) -> Iterator[None]:
    """Runs the block with torch's global CPU RNG drawing from `generator`'s stream.

    For code that samples from the global RNG and takes no generator (such as kornia): the
    global state is set to `generator`'s, the block runs, the advanced state is stored back in `generator`, and
    the global RNG is restored as if the block had drawn nothing from it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.get_rng_state())


# kornia's RandAugment candidates (kornia.augmentation.auto.rand_augment.default_policy, the timm/DeiT list of
# 15 operations) without two whose kornia forms destroy the image at DeiT's magnitude: kornia's "brightness"
# adds up to +0.9 (almost white at m9; its "contrast", a multiplicative factor, still covers brightness), and
# its "solarize_add" inverts every pixel above 0.5 after the addition. "color" (saturation) needs RGB and is
# dropped for images with another number of channels.
RANDAUGMENT_POLICY: tuple[tuple[str, float, float], ...] = (
    ("auto_contrast", 0, 1),
    ("equalize", 0, 1),
    ("invert", 0, 1),
    ("rotate", -30.0, 30.0),
    ("posterize", 4.0, 8.0),
    ("solarize", 0.0, 1.0),
    ("color", 0.1, 1.9),
    ("contrast", 0.1, 1.9),
    ("sharpness", 0.1, 1.9),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("translate_x", -0.1, 0.1),
    ("translate_y", -0.1, 0.1),
)
RANDAUGMENT_GROUP = 8
"""kornia's RandAugment draws one choice of operations per call; it is called on groups of this many images,
so a batch sees `B / RANDAUGMENT_GROUP` independent choices (per-image calls cost ~6x more on a CPU)."""


def _kornia():
    try:
        import kornia.augmentation as kornia_augmentation
        from kornia.augmentation.auto import RandAugment
    except ImportError as err:
        raise UserError("RandAugment and random erasing need kornia; install it with pip install "
                        "'polyattn[vision]' or turn them off (data.randaugment_ops=0, data.random_erase=0).") from err
    return kornia_augmentation, RandAugment


class TrainAugment:
    """Random crop and horizontal flip of a uint8 batch, optional RandAugment, normalization to float32, and
    optional random erasing.

    Two crops, chosen by the arguments:
      - `pad > 0`: CIFAR-style; zero-pad by `pad` pixels on each side and take a random crop of the original
        size (offsets uniform in [0, 2·pad] per sample).
      - `scale=(lo, hi)`: random-resized crop (Inception style, arXiv 1409.4842): per sample an area fraction
        in [lo, hi] and a log-uniform aspect ratio in `ratio`, the crop sides clamped to the image, resized
        bilinearly to `size` (default: the input size) with one `grid_sample` over the batch.
    With neither, only flip and normalization. `flip` is the probability of mirroring left-right; leave it
    0 for data that is not mirror-symmetric (handwritten digits).

    RandAugment (Cubuk et al., arXiv 1909.13719), with kornia's implementation: `randaugment_ops` operations
    drawn without replacement from `RANDAUGMENT_POLICY` and applied in turn, each at `randaugment_magnitude`
    on the 0–10 scale of timm and DeiT ("rand-m9"; kornia's m = 3 × it, on its 0–30 scale), with a random sign
    for the symmetric ones (rotate, shear, translate). kornia picks one set of operations per call; it is
    called on groups of `RANDAUGMENT_GROUP` images. Unlike timm there is no magnitude noise (mstd).

    Random erasing (Zhong et al., arXiv 1708.04896), kornia's: with probability `erase` per image, one
    rectangle of 2–33 % of the area and aspect ratio in [0.3, 3.3] is set to 0 after normalization, i.e. to
    the dataset's mean colour (timm's "const" mode; DeiT uses per-pixel noise).

    Draw order from the generator, per call: crop offsets (rows, then columns) or crop parameters (area,
    ratio, x, y), then the flip coins, then RandAugment (group by group), then erasing. With RandAugment and
    erasing off nothing more is drawn, so such runs augment exactly as before these options existed.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, pad: int = 0,
                 scale: tuple[float, float] | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: float = 0.0, size: int | None = None, randaugment_ops: int = 0,
                 randaugment_magnitude: float = 9.0, erase: float = 0.0):
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
        if not 0 <= randaugment_ops <= len(RANDAUGMENT_POLICY):
            raise UserError(f"The number of RandAugment operations (data.randaugment_ops) must be between 0 (off) "
                            f"and {len(RANDAUGMENT_POLICY)}, got {randaugment_ops}.")
        if randaugment_ops and not 0.0 < randaugment_magnitude < 10.0:
            raise UserError(f"The RandAugment magnitude (data.randaugment_magnitude) is on a 0-10 scale and must "
                            f"be strictly between 0 and 10, got {randaugment_magnitude}.")
        if not 0.0 <= erase <= 1.0:
            raise UserError(f"The random-erasing probability (data.random_erase) must be in [0, 1], got {erase}.")
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad, self.scale, self.ratio, self.flip, self.size = pad, scale, ratio, flip, size
        self.randaugment_ops, self.randaugment_magnitude, self.erase = randaugment_ops, randaugment_magnitude, erase
        self._randaugment: dict[bool, object] = {}  # one kornia module per policy (with or without "color")
        self._eraser = None
        if randaugment_ops or erase:
            kornia_augmentation, _ = _kornia()
            if erase:
                self._eraser = kornia_augmentation.RandomErasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=0.0,
                                                                 p=erase)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.scale is not None:
            x = self._resized_crop(images, generator)
        else:
            x = self._pad_crop_flip(images, generator)
        if self.randaugment_ops:
            x = self._rand_augment(x, generator)
        x = normalize(x, self.mean, self.std)
        if self._eraser is not None:
            with generator_as_global_rng(generator):
                x = self._eraser(x)
        return x

    def _rand_augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 or float 0..255 `[B, C, H, W]` → float32 0..255, RandAugmented group by group."""
        rgb = images.shape[1] == 3
        if rgb not in self._randaugment:
            _, RandAugment = _kornia()
            policy = [[op] for op in RANDAUGMENT_POLICY if rgb or op[0] != "color"]
            self._randaugment[rgb] = RandAugment(n=min(self.randaugment_ops, len(policy)),
                                                 m=3.0 * self.randaugment_magnitude, policy=policy)
        randaugment = self._randaugment[rgb]
        x = images.float() / 255.0  # kornia's operations expect [0, 1]
        with generator_as_global_rng(generator):
            x = torch.cat([randaugment(group) for group in x.split(RANDAUGMENT_GROUP)])
        return x.clamp_(0.0, 1.0) * 255.0

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


class MixupCutmix:
    """Mixup (Zhang et al., arXiv 1710.09412) or CutMix (Yun et al., arXiv 1905.04899) of a batch, with soft
    targets.

    Per batch, as timm's "batch" mode used by DeiT: with probability `prob` the batch is mixed, by CutMix with
    probability `switch_prob` when both alphas are > 0 (otherwise by the one whose alpha is > 0), with one
    λ ~ Beta(α, α) for the batch. Sample i is mixed with sample B − 1 − i (the batch reversed; batches come
    shuffled).

      - Mixup: `x_i ← λ x_i + (1 − λ) x_{B−1−i}`.
      - CutMix: a box of sides `√(1 − λ)` × the image sides, centred uniformly, clipped to the image, takes the
        pixels of `x_{B−1−i}`; λ is then set to the area fraction that was *not* pasted.

    Targets are `λ · onehot(y_i) + (1 − λ) · onehot(y_{B−1−i})`, float32 `[B, num_classes]` summing to 1
    (one-hot when the batch is not mixed); label smoothing is left to the loss
    (`ClassificationTask.loss`), where smoothing the mixture equals mixing smoothed labels.

    Draw order from the generator, per call: the mix coin, then (if mixed) the switch coin when both alphas are
    > 0, the seed of λ's Beta draw (numpy's sampler), and for CutMix the box centre (row, then column).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5):
        for value, name, key in ((mixup_alpha, "mixup alpha", "data.mixup_alpha"),
                                 (cutmix_alpha, "cutmix alpha", "data.cutmix_alpha")):
            if not value >= 0.0:
                raise UserError(f"The {name} ({key}) must be >= 0 (0 turns it off), got {value}.")
        for value, name, key in ((prob, "mixing probability", "data.mix_prob"),
                                 (switch_prob, "cutmix switch probability", "data.mix_switch_prob")):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"The {name} ({key}) must be in [0, 1], got {value}.")
        if num_classes < 1:
            raise UserError(f"Mixup and cutmix need at least one class, got {num_classes}.")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob

    @property
    def enabled(self) -> bool:
        """Whether any batch can be mixed (an alpha > 0 and `prob` > 0)."""
        return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images `[B, C, H, W]` and class indices `[B]` → mixed images and soft targets `[B, classes]`."""
        targets = F.one_hot(labels.long(), self.num_classes).float()  # (B, classes)
        if not self.enabled or not float(torch.rand((), generator=generator)) < self.prob:
            return images, targets
        if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
            cutmix = float(torch.rand((), generator=generator)) < self.switch_prob
        else:
            cutmix = self.cutmix_alpha > 0.0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        # numpy's Beta sampler, seeded from the generator: torch's returns 0.5 or a 1e-38 floor for small α
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        other = images.flip(0)
        if cutmix:
            h, w = images.shape[-2:]
            side = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(h * side), int(w * side)
            cy = int(torch.randint(0, h, (), generator=generator))
            cx = int(torch.randint(0, w, (), generator=generator))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            mixed = images.clone()
            mixed[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            mixed = images * lam + other * (1.0 - lam)
        return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


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
