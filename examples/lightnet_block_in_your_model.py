"""A LightNet block inside your own nn.Module: a small image classifier written from polyattn's layers.

LightNet's additive linear attention (arXiv 2405.21022) mixes the tokens of a 2-D grid in one scan; with MD-LRPE
(`lrpe="cosine"`) it knows each token's position on the grid, and MD-TPE adds a decayed scan along each axis.

    python examples/lightnet_block_in_your_model.py [--steps 30] [--size 16]
"""

import argparse

import torch
from torch import nn

from polyattn.layers import LightNetBlock, MdTpe, PatchEmbed, RMSNorm, build_mixer


class TinyLightNetClassifier(nn.Module):
    def __init__(self, img_size: int = 16, patch_size: int = 4, dim: int = 64, depth: int = 2, num_heads: int = 2,
                 num_classes: int = 3):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans=3, embed_dim=dim)
        self.grid = self.patch_embed.grid_size  # (rows, cols) of patches
        self.tpe = MdTpe(dim, num_heads, num_axes=2)  # positions by a decayed scan along rows and columns
        # any token mixer of polyattn.layers.mixer fits the block: "lightnet", "softmax", "multiscan", or a class
        self.blocks = nn.ModuleList(
            LightNetBlock(dim, build_mixer("lightnet", dim, num_heads, causal=False, lrpe="cosine",
                                           grid_shape=self.grid))
            for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, N, D) with N = rows · cols
        x, _ = self.tpe(x, grid_shape=self.grid)
        for block in self.blocks:
            x, _ = block(x, grid_shape=self.grid)
        return self.head(self.norm(x).mean(1))  # mean-pooled, as LightNet's vision models


def main(steps: int = 30, size: int = 16) -> float:
    torch.manual_seed(0)
    model = TinyLightNetClassifier(img_size=size)
    # a toy task: which colour channel is the brightest (3 classes)
    labels = torch.arange(64) % 3
    images = torch.rand(64, 3, size, size) - 0.5
    images[torch.arange(64), labels] += 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; after {steps} steps: loss "
          f"{loss.item():.3f}, accuracy {accuracy:.2f}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    main(args.steps, args.size)
