"""iLLaMA: a plain ViT whose blocks are LLaMA decoder blocks.

arXiv 2404.06773 (Wang et al., "Adapting LLaMA Decoder to Vision Transformer"); spec shared/reference/illama.md.
Patch conv, the class token appended *after* the patches (the head reads the last token, so a causal mask still
lets it see every patch), a learned absolute position table plus 1-D interleaved RoPE over the raster order
(class token at position N), pre-RMSNorm blocks of attention and a bias-free SwiGLU, final RMSNorm, linear head.

The attention mask is a constructor choice (`mask_mode`); the soft-mask value `a` is a forward input, stepped
by the training loop's input schedule (`schedules.soft_mask_a`), never a model attribute. The released model uses
`illama_soft`: a post-softmax multiplicative mask without renormalisation, which is *not* causal even at `a = 0`
(spec §3); it is the default here so that released weights and numbers reproduce. `causal` is the true −inf mask.
"""

from __future__ import annotations

import math
from enum import Enum
from functools import partial
from typing import Literal

import torch
from torch import nn

from ..errors import parse_enum
from ..layers.attention import Attention, parse_mask_mode
from ..layers.block import TransformerBlock
from ..layers.init import init_linear
from ..layers.mlp import GatedMlp, llama_hidden_size
from ..layers.norm import RMSNorm
from ..layers.patch_embed import PatchEmbed, PatchStem
from ..layers.pos_embed import resample_abs_pos_embed
from ..layers.rope import Rotary, RotaryEmbedding
from ..ops.attention import MaskMode
from ..registry import register_model
from .classifier import EarlyExitMixin, LinearHeadMixin


class IllamaPosEmbed(str, Enum):
    """iLLaMA's positions: a learned absolute table, RoPE over the sequence order, or both (the paper)."""

    LEARNED_ROPE = "learned+rope"
    ROPE = "rope"
    LEARNED = "learned"

    @property
    def learned(self) -> bool:
        return self is not IllamaPosEmbed.ROPE

    @property
    def rope(self) -> bool:
        return self is not IllamaPosEmbed.LEARNED


class ClsPosition(str, Enum):
    """Where the class token sits in the sequence."""

    LAST = "last"  # post-sequence (the paper): under a causal mask it sees every patch
    FIRST = "first"  # ViT's


class ILLaMA(EarlyExitMixin, LinearHeadMixin, nn.Module):
    """iLLaMA image classifier (arXiv 2404.06773) with timm's contract.

    Token layout: `[patches (raster order), cls]` for `cls_position="last"` (the paper's post-sequence class
    token) or `[cls, patches]` for `"first"` (the roadmap step that fails to train under a causal mask: the class
    token then sees only itself). RoPE positions follow the sequence order, so with the class token last it sits
    at position N, as in the released code.

    Images of another size than `img_size` are accepted when the patch size divides them: the learned table is
    resampled (bicubic; the class slot stays where it is) and the RoPE angles are computed for the new length,
    in forward and when loading weights.

    Parameters (1000 classes, `P` patch side, `N` patches, `h = llama_hidden_size(D, ffn_multiple_of)`):
    `depth·(4D² + 4D + 2D + 3Dh) + 3P²D + D + D + (N+1)·D + D + DC + C` (spec §5).

    Args:
        img_size (int | tuple[int, int]): default image size; sets the learned table's grid. Default: 224.
        patch_size (int | tuple[int, int]): patch side. Default: 16.
        in_chans (int): image channels. Default: 3.
        num_classes (int): classes of the head; 0 = no head (features only). Default: 1000.
        embed_dim (int): width `D`. Default: 768.
        depth (int): number of blocks. Default: 12.
        num_heads (int): attention heads (head dim 64 in every released size). Default: 12.
        ffn_multiple_of (int): the SwiGLU hidden size `int(8D/3)` is rounded up to a multiple of this (LLaMA's
            rule; 256 reproduces the paper's parameter counts). Default: 256.
        qkv_bias (bool): biases on q, k, v (the released model has them). Default: True.
        cls_position (str): "last" (post-sequence, the paper) or "first" (ViT's). Default: "last".
        pos_embed (str): "learned+rope" (the paper), "rope" or "learned". Default: "learned+rope".
        mask_mode (MaskMode | str): "illama_soft" (released operator), "causal", "soft_causal" or
            "bidirectional". Default: "illama_soft".
        rope_base (float): RoPE frequency base. Default: 10000.0.
        drop_rate (float): dropout after the position embedding and before the head. Default: 0.0.
        drop_path_rate (float): stochastic depth of the last block; rises linearly from 0. Default: 0.0.
        reversible (bool): run the blocks as a reversible stack (`polyattn.layers.reversible`: two coupled residual
            streams, activations recomputed in backward, training memory flat in depth). Default: False.
        early_exit (bool): an exit after every block (`EarlyExitMixin`: the shared head, an RMSNorm per exit),
            trained with the deep-supervision loss of all exits. Default: False.
        exit_threshold (float): in eval mode an input leaves at the first exit whose top softmax probability
            exceeds this (1.0 = never: the full model). Default: 1.0.
        stem (str): "patch" (one strided convolution per patch, ViT's) or "conv" (the convolutional stem of Xiao
            et al. 2021: 3x3 stride-2 convolutions with BatchNorm and ReLU; `polyattn.layers.PatchEmbed`) or
            "resnet" (that stem with a ResNet basic block after each stride-2 convolution). Default: "patch".
    """

    GLOBAL_POOLS = ("token",)

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_multiple_of: int = 256,
        qkv_bias: bool = True,
        cls_position: ClsPosition | Literal["last", "first"] = "last",
        pos_embed: IllamaPosEmbed | Literal["learned+rope", "rope", "learned"] = "learned+rope",
        mask_mode: MaskMode | str = "illama_soft",
        rope_base: float = 10000.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reversible: bool = False,
        early_exit: bool = False,
        exit_threshold: float = 1.0,
        stem: PatchStem | Literal["patch", "conv", "resnet"] = "patch",
    ):
        super().__init__()
        self.reversible = reversible
        cls_position = parse_enum(ClsPosition, cls_position, "cls_position")
        pos_embed = parse_enum(IllamaPosEmbed, pos_embed, "pos_embed")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads})")
        self.num_classes, self.global_pool = num_classes, "token"
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token (a suffix when cls_position="last")
        self.cls_position = cls_position
        self.mask_mode = parse_mask_mode(mask_mode)
        self.head_dim = embed_dim // num_heads
        norm_layer = partial(RMSNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True, stem=stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed.learned:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        else:
            self.pos_embed = None
        # Angles are computed per call from the positions (a [N+1, hd/2] table, in float64): nothing to store,
        # nothing to resize, and a dtype cast of the model cannot round them (spec §8.7).
        self.rope = RotaryEmbedding(self.head_dim, base=rope_base, interleaved=True) if pos_embed.rope else None
        self.pos_drop = nn.Dropout(drop_rate)

        hidden = llama_hidden_size(embed_dim, multiple_of=ffn_multiple_of)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            TransformerBlock(
                embed_dim,
                attn=Attention(embed_dim, num_heads, qkv_bias=qkv_bias, proj_bias=True, mask_mode=self.mask_mode),
                mlp=GatedMlp(embed_dim, hidden, act_layer=nn.SiLU, bias=False),
                norm_layer=norm_layer,
                drop_path=dpr[i],
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_early_exit(early_exit, exit_threshold, norm_layer, embed_dim, reversible=reversible)

        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # trunc-normal std 0.02 as the released code (the paper's tables say 0.2); the patch conv keeps
        # PyTorch's default init, as in the reference
        self.apply(init_linear)

    # --- timm contract ------------------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} if self.pos_embed is not None else {"cls_token"}

    # --- forward ------------------------------------------------------------------------------------------------

    @property
    def _cls_last(self) -> bool:
        return self.cls_position is ClsPosition.LAST

    def rotary(self, num_tokens: int, device: torch.device | str | None = None) -> Rotary:
        """RoPE angles for a sequence of `num_tokens = N + 1` tokens: position = index in the sequence.

        With the class token last it gets position N (196 at 224 px), as `precompute_freqs_cis` in the reference.
        """
        if self.rope is None:
            raise ValueError("this model was built with pos_embed='learned' and has no RoPE")
        return self.rope(torch.arange(num_tokens, device=device))

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((x, cls) if self._cls_last else (cls, x), dim=1)  # (B, N + 1, D)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != self.patch_embed.grid_size:
                pos = resample_abs_pos_embed(pos, grid, self.patch_embed.grid_size, num_prefix_tokens=1,
                                             prefix_at_end=self._cls_last)
            x = x + pos.to(x.dtype)
        return self.pos_drop(x)

    def _tokens(self, x: torch.Tensor, soft_mask_a: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, dict]:
        """Images → the tokens the blocks read `[B, N + 1, D]` and the blocks' keyword arguments (RoPE, `a`)."""
        grid = self.patch_embed.grid_for(tuple(x.shape[-2:]))
        x = self._pos_embed(self.patch_embed(x), grid)  # (B, N + 1, D)
        rope = self.rotary(x.shape[1], x.device) if self.rope is not None else None
        return x, dict(rope=rope, soft_mask_a=soft_mask_a)

    def forward_features(self, x: torch.Tensor, soft_mask_a: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Images `[B, C, H, W]` → normalised tokens `[B, N + 1, D]` (class token last, or first).

        Args:
            x (Tensor): images `[B, C, H, W]`, H and W multiples of the patch size.
            soft_mask_a (float | Tensor): the soft-mask value `a` for the `illama_soft` and `soft_causal` modes
                (1 = bidirectional, 0 = the final mask); ignored by the others. Default: 0.0.
        """
        return self._features(*self._tokens(x, soft_mask_a=soft_mask_a))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens `[B, N + 1, D]` → class-token features `[B, D]` (`pre_logits`) or logits `[B, num_classes]`."""
        x = self.head_drop(x[:, -1] if self._cls_last else x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, soft_mask_a: float | torch.Tensor = 0.0, *,
                all_exits: bool = False) -> torch.Tensor:
        """Images `[B, C, H, W]` → logits `[B, num_classes]`; evaluation uses the default `a = 0`. With
        `all_exits` (an `early_exit` model) every exit's logits, `[depth, B, num_classes]`."""
        return self._forward(x, all_exits, soft_mask_a=soft_mask_a)

    # --- weights from another resolution or from the reference code --------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights trained at another resolution: resample the learned table, keeping the class slot in place.
        key = prefix + "pos_embed"
        if key in state_dict and self.pos_embed is not None:
            saved = state_dict[key]
            if saved.shape != self.pos_embed.shape and saved.ndim == 3:
                side = math.isqrt(saved.shape[1] - 1)
                if side * side == saved.shape[1] - 1:
                    state_dict[key] = resample_abs_pos_embed(saved, self.patch_embed.grid_size, (side, side),
                                                             num_prefix_tokens=1, prefix_at_end=self._cls_last)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps a state dict of the official code (techmonsterwang/iLLaMA `models/illama.py`) to `ILLaMA`'s names.

    The fused `attn.qkv` is split into `q_proj`, `k_proj`, `v_proj` (in that order); `attn.proj` → `o_proj`;
    SwiGLU `fc1` (gate) → `w1`, `fc3` (up) → `w3`, `fc2` (down) → `w2`. Other names are identical. The RoPE
    layouts already agree (interleaved pairs). Load the result with `model.load_state_dict(...)`; a table for
    another resolution is resampled on load.
    """
    out = {}
    for name, value in state_dict.items():
        name = name.removeprefix("module.")
        if ".attn.qkv." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[name.replace("qkv", part)] = chunk
            continue
        name = name.replace(".attn.proj.", ".attn.o_proj.")
        name = name.replace(".mlp.fc1.", ".mlp.w1.").replace(".mlp.fc2.", ".mlp.w2.").replace(".mlp.fc3.", ".mlp.w3.")
        out[name] = value
    return out



@register_model(ILLaMA, task="classification")
def illama_femto():
    """iLLaMA-femto: D=128, 9 blocks, 2 heads, SwiGLU 512; 2.62M parameters at 224 px (in the code, not the paper)."""
    return dict(embed_dim=128, depth=9, num_heads=2)


@register_model(ILLaMA, task="classification")
def illama_nano():
    """iLLaMA-nano: D=128, 12 blocks, 2 heads, SwiGLU 512; 3.41M parameters at 224 px (in the code, not the paper)."""
    return dict(embed_dim=128, depth=12, num_heads=2)


@register_model(ILLaMA, task="classification")
def illama_tiny():
    """iLLaMA-T: D=192, 12 blocks, 3 heads, SwiGLU 512; 5.70M parameters at 224 px."""
    return dict(embed_dim=192, depth=12, num_heads=3)


@register_model(ILLaMA, task="classification")
def illama_small():
    """iLLaMA-S: D=384, 12 blocks, 6 heads, SwiGLU 1024; 22.0M parameters at 224 px."""
    return dict(embed_dim=384, depth=12, num_heads=6)


@register_model(ILLaMA, task="classification")
def illama_base():
    """iLLaMA-B: D=768, 12 blocks, 12 heads, SwiGLU 2048; 86.5M parameters at 224 px."""
    return dict(embed_dim=768, depth=12, num_heads=12)


@register_model(ILLaMA, task="classification")
def illama_large():
    """iLLaMA-L: D=1024, 24 blocks, 16 heads, SwiGLU 2816; 310M parameters at 224 px."""
    return dict(embed_dim=1024, depth=24, num_heads=16)
