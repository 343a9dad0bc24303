"""Image to patch tokens: one strided convolution (ViT's patchify), or a convolutional stem (Xiao et al. 2021,
"Early Convolutions Help Transformers See Better", arXiv 2106.14881) that reaches the same patch grid through
3x3 stride-2 convolutions."""

from enum import Enum

import torch
from torch import nn

from ..errors import UserError, parse_enum


class PatchStem(str, Enum):
    """How images become patch tokens."""

    PATCH = "patch"  # one p x p convolution of stride p: ViT's patchify
    CONV = "conv"  # log2(p) 3x3 stride-2 convolutions, each with BatchNorm and ReLU, then a 1x1 convolution
    RESNET = "resnet"  # CONV with a ResNet basic block after each stride-2 convolution


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair, got {x!r}")
    return (int(x[0]), int(x[1]))


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016) at a fixed width: two 3x3 convolutions with BatchNorm, a skip, ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class PatchEmbed(nn.Module):
    """Images to `embed_dim` tokens on the grid of `patch_size` patches.

    `stem="patch"`: each non-overlapping patch projected by one strided convolution (`proj`). `stem="conv"`: the
    convolutional stem of Xiao et al. (2021): for a patch side p = 2^k, k 3x3 convolutions of stride 2 (padding 1),
    each followed by BatchNorm and ReLU, with channels doubling up to `embed_dim` (D/2^(k-1), ..., D/2, D), then a
    1x1 convolution (`proj`) to `embed_dim`. The paper's stem replaces a 16x16 patchify with four such
    convolutions and one transformer block; it trains faster and more stably on small data. Its 3x3 windows
    overlap the neighbouring patches, so a token sees a pixel or so beyond its own patch (a causal token mixer
    after it orders the tokens, not the pixels). `stem="resnet"`: the same with a ResNet basic block
    (`BasicBlock`) after each stride-2 convolution, the hybrid's convolutional half (as in the stems of hybrid
    ViTs, Dosovitskiy et al. 2020 §3.1): more local feature extraction at the higher resolutions, where
    convolutions are cheap and small data favours them.

    Any image whose height and width are multiples of the patch size is accepted; `img_size` is only the
    default grid that position embeddings are built for. Output: tokens `[B, H/p · W/p, D]` in raster
    (row-major) order.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, stem: PatchStem | str = PatchStem.PATCH):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.stem = parse_enum(PatchStem, stem, "stem")
        if self.stem is PatchStem.PATCH:
            self.convs = None
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size,
                                  bias=bias)
            return
        p = self.patch_size[0]
        if self.patch_size[1] != p or p < 2 or p & (p - 1):
            raise UserError(f"The convolutional stem halves the image per 3x3 convolution, so it needs a square "
                            f"patch size that is a power of two (2, 4, 8, 16); got {self.patch_size}. Choose such "
                            f"a patch size or stem=patch.")
        steps = p.bit_length() - 1
        widths = [max(1, embed_dim >> (steps - 1 - i)) for i in range(steps)]  # ..., D/2, D
        layers, c = [], in_chans
        for width in widths:  # BatchNorm follows, so the convolutions need no bias
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if self.stem is PatchStem.RESNET:
                layers.append(BasicBlock(width))
            c = width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=1, bias=bias)

    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an image of `size` (H, W); a clear error when the size does not divide."""
        (h, w), (ph, pw) = size, self.patch_size
        if h % ph or w % pw:
            raise UserError(f"Image size {h}x{w} is not divisible by the patch size {ph}x{pw}; "
                            f"resize the images or choose a patch size that divides them.")
        return (h // ph, w // pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise UserError(f"Expected images of shape [B, {self.in_chans}, H, W], got {list(x.shape)}.")
        if not x.is_floating_point():
            raise UserError(f"Expected normalised floating-point images, got {x.dtype}; convert uint8 pixels with "
                            f"the run's normalisation (polyattn.data.transforms.EvalTransform) first.")
        self.grid_for(tuple(x.shape[-2:]))
        if self.convs is not None:
            x = self.convs(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
