"""A Perceiver-style latent image classifier (Perceiver: Jaegle et al., arXiv 2103.03206).

    image → patches + fixed 2-D sin-cos positions → T tokens
    N learned latents ── cross-attend to the T tokens (CrossAttentionBlock: O(N·T)) ──→ N latents
    → [self-attention among the latents (O(N²)) + MLP] × depth → norm → mean over latents → head

The image is read once, by the cross-attention; the depth of the model runs on N latents whatever the resolution,
so a larger image costs only the O(N·T) cross-attention and the patch embedding more. With
`linear_cross_attention=True` the cross-attention is linear (`LinearCrossAttention`: the patches summarised into a
fixed-size state, O(T·D²) once, then O(D²) per latent). Positions are a fixed sin-cos table computed for the grid
of each input, so any image size that the patch size divides is accepted with the same weights.

Simplifications against the paper, which cross-attends repeatedly with shared weights and uses Fourier features of
the raw pixels: one cross-attention, patch tokens, the library's pre-norm blocks.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.block import TransformerBlock
from ..layers.cross_attention import CrossAttentionBlock, LinearCrossAttention
from ..layers.init import init_linear
from ..layers.mlp import Mlp
from ..layers.patch_embed import PatchEmbed, PatchStem
from ..layers.pos_embed import sincos_pos_embed
from ..registry import register_model
from .classifier import LinearHeadMixin


class PerceiverVision(LinearHeadMixin, nn.Module):
    """Latent image classifier (module docstring) with timm's contract (`forward_features`, `forward_head`,
    `reset_classifier`).

    Args:
        img_size (int | tuple[int, int]): training image size. Default: 32.
        patch_size (int | tuple[int, int]): patch side. Default: 4.
        in_chans (int): image channels. Default: 3.
        num_classes (int): classes; 0 = features only. Default: 10.
        embed_dim (int): width `D` of the tokens and latents. Default: 128.
        num_latents (int): latents `N`. Default: 64.
        depth (int): self-attention blocks over the latents. Default: 6.
        num_heads (int): heads of the latent blocks. Default: 4.
        cross_heads (int): heads of the cross-attention. Default: 1 (the paper's).
        linear_cross_attention (bool): linear instead of softmax cross-attention. Default: False.
        mlp_ratio (float): MLP width over `D`. Default: 4.0.
        drop_rate (float): dropout in the MLPs and before the head. Default: 0.0.
        drop_path_rate (float): stochastic depth of the last latent block (linear in depth). Default: 0.0.
        stem (str): "patch" (one strided convolution per patch), "conv" (the convolutional stem of Xiao et al.
            2021; `polyattn.layers.PatchEmbed`) or "resnet" (that stem with a ResNet basic block after each
            stride-2 convolution). Default: "patch".
    """

    GLOBAL_POOLS = ("avg",)

    def __init__(self, img_size: int | tuple[int, int] = 32, patch_size: int | tuple[int, int] = 4,
                 in_chans: int = 3, num_classes: int = 10, embed_dim: int = 128, num_latents: int = 64,
                 depth: int = 6, num_heads: int = 4, cross_heads: int = 1, linear_cross_attention: bool = False,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 stem: PatchStem | Literal["patch", "conv", "resnet"] = "patch"):
        super().__init__()
        if num_latents < 1:
            raise ValueError(f"num_latents must be at least 1, got {num_latents}")
        if embed_dim % 4:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of 4 (the 2-D sin-cos positions)")
        self.num_classes, self.global_pool = num_classes, "avg"
        self.num_features = self.embed_dim = embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, stem=stem)
        self.latents = nn.Parameter(torch.zeros(1, num_latents, embed_dim))
        self.cross = CrossAttentionBlock(
            embed_dim, cross_heads, attn_layer=LinearCrossAttention if linear_cross_attention else Attention,
            mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, Attention(embed_dim, num_heads, qkv_bias=True),
                             Mlp(embed_dim, int(embed_dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate),
                             norm_layer, drop_path=dpr[i])
            for i in range(depth))
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear)
        nn.init.trunc_normal_(self.latents, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"latents"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` → normalised latents `[B, N, D]`."""
        grid = self.patch_embed.grid_for(tuple(x.shape[-2:]))
        tokens = self.patch_embed(x)  # (B, T, D)
        tokens = tokens + sincos_pos_embed(grid, self.embed_dim).to(tokens)
        z = self.cross(self.latents.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens)  # (B, N, D): O(N·T)
        for block in self.blocks:
            z, _ = block(z)
        return self.norm(z)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(PerceiverVision, task="classification")
def perceiver_vision_nano():
    """Perceiver latent classifier (arXiv 2103.03206): 64 latents cross-attend to 4x4 patches, D 128, 6 blocks."""
    return dict(embed_dim=128, num_latents=64, depth=6, num_heads=4, patch_size=4)


@register_model(PerceiverVision, task="classification")
def perceiver_vision_tiny():
    """Perceiver latent classifier, 128 latents, D 192, 12 blocks, 3 heads, 4x4 patches."""
    return dict(embed_dim=192, num_latents=128, depth=12, num_heads=3, patch_size=4)


__all__ = ["PerceiverVision"]
