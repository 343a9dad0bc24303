"""Image to patch tokens."""

import torch
from torch import nn

from ..errors import UserError


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair, got {x!r}")
    return (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Splits an image into non-overlapping patches and projects each to `embed_dim` (a strided conv).

    Any image whose height and width are multiples of the patch size is accepted; `img_size` is only the
    default grid that position embeddings are built for. Output: tokens `[B, H/p · W/p, D]` in raster
    (row-major) order.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

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
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
