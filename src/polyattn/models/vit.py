"""ViT / DeiT: the softmax vision baseline.

ViT: Dosovitskiy et al., arXiv 2010.11929. DeiT sizes and recipe: Touvron et al., arXiv 2012.12877.
Patch embedding, a class token in front, learned (or fixed sin-cos) absolute positions, pre-LayerNorm blocks
of bidirectional attention and a GELU MLP, final norm, linear head on the class token (or the mean token).
"""

from __future__ import annotations

from enum import Enum
from functools import partial
from typing import Literal

import torch
from torch import nn

from ..errors import parse_enum
from ..layers.attention import Attention
from ..layers.block import TransformerBlock
from ..layers.init import init_linear
from ..layers.mlp import Mlp
from ..layers.patch_embed import PatchEmbed, PatchStem
from ..layers.pos_embed import resample_abs_pos_embed, sincos_pos_embed
from ..registry import register_model
from .classifier import EarlyExitMixin, LinearHeadMixin


class VitPosEmbed(str, Enum):
    """ViT's absolute positions."""

    LEARNED = "learned"  # a trained table (ViT, DeiT)
    SINCOS = "sincos"  # a fixed 2-D sin-cos table (MAE, MoCo v3)


class VisionTransformer(EarlyExitMixin, LinearHeadMixin, nn.Module):
    """Isotropic ViT classifier with timm's contract (`forward_features`, `forward_head`, `reset_classifier`).

    Images of another size than `img_size` are accepted as long as the patch size divides them: the
    position table is resampled (bicubic) to the new grid, in forward and when loading weights. `reversible=True`
    runs the blocks as a reversible stack (`polyattn.layers.reversible`). `early_exit=True` adds an exit after
    every block (`EarlyExitMixin`: one shared head, a LayerNorm per exit) and `exit_threshold` the confidence at
    which an input leaves in eval mode (1.0 = never: the full model). `stem="conv"` reaches the patch grid through
    a convolutional stem (Xiao et al. 2021; `polyattn.layers.PatchEmbed`) instead of one strided convolution, and
    `stem="resnet"` through that stem with a ResNet basic block after each stride-2 convolution (a hybrid ViT).
    """

    GLOBAL_POOLS = ("token", "avg")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        global_pool: Literal["token", "avg"] = "token",
        pos_embed: VitPosEmbed | Literal["learned", "sincos"] = "learned",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reversible: bool = False,
        early_exit: bool = False,
        exit_threshold: float = 1.0,
        stem: PatchStem | Literal["patch", "conv", "resnet"] = "patch",
    ):
        super().__init__()
        self.reversible = reversible
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        pos_embed = parse_enum(VitPosEmbed, pos_embed, "pos_embed")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, stem=stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        if pos_embed is VitPosEmbed.LEARNED:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            table = sincos_pos_embed(self.patch_embed.grid_size, embed_dim)
            table = torch.cat([torch.zeros(1, embed_dim), table]).unsqueeze(0)  # the class token gets no position
            self.register_buffer("pos_embed", table, persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            TransformerBlock(
                embed_dim,
                attn=Attention(embed_dim, num_heads, qkv_bias=qkv_bias, proj_bias=True),
                mlp=Mlp(embed_dim, int(embed_dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate),
                norm_layer=norm_layer,
                drop_path=dpr[i],
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_early_exit(early_exit, exit_threshold, norm_layer, embed_dim, reversible=reversible)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos = resample_abs_pos_embed(pos, grid, self.patch_embed.grid_size, num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        return self.pos_drop(x + pos.to(x.dtype))

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Images → the tokens the blocks read `[B, 1 + N, D]` and the blocks' keyword arguments (none)."""
        grid = self.patch_embed.grid_for(tuple(x.shape[-2:]))
        return self._pos_embed(self.patch_embed(x), grid), {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` → normalised tokens `[B, 1 + N, D]` (class token first)."""
        return self._features(*self._tokens(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, *, all_exits: bool = False) -> torch.Tensor:
        """Images → logits `[B, C]`; with `all_exits` (an `early_exit` model) every exit's, `[depth, B, C]`."""
        return self._forward(x, all_exits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights trained at another resolution: resample the position table to this model's grid.
        key = prefix + "pos_embed"
        if key in state_dict and isinstance(self.pos_embed, nn.Parameter):
            saved = state_dict[key]
            if saved.shape != self.pos_embed.shape:
                old_n = saved.shape[1] - self.num_prefix_tokens
                side = round(old_n**0.5)
                if side * side == old_n:
                    state_dict[key] = resample_abs_pos_embed(saved, self.patch_embed.grid_size, (side, side),
                                                             num_prefix_tokens=self.num_prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)



@register_model(VisionTransformer, task="classification")
def vit_nano():
    """ViT with D=128, 6 blocks, 4 heads: a CPU-sized baseline."""
    return dict(embed_dim=128, depth=6, num_heads=4)


@register_model(VisionTransformer, task="classification")
def vit_tiny():
    """ViT-Ti/16 (DeiT-Ti): D=192, 12 blocks, 3 heads; 5.7M parameters at 224 px."""
    return dict(embed_dim=192, depth=12, num_heads=3)


@register_model(VisionTransformer, task="classification")
def vit_small():
    """ViT-S/16 (DeiT-S): D=384, 12 blocks, 6 heads; 22M parameters at 224 px."""
    return dict(embed_dim=384, depth=12, num_heads=6)


@register_model(VisionTransformer, task="classification")
def vit_base():
    """ViT-B/16 (DeiT-B): D=768, 12 blocks, 12 heads; 86M parameters at 224 px."""
    return dict(embed_dim=768, depth=12, num_heads=12)

