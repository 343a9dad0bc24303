"""LightNet image classifier and the multiplicative multi-scan baseline at the same width and depth.

arXiv 2405.21022 (Qin et al., "You Only Scan Once", LightNet); spec shared/reference/lightnet.md §3.4, §4, §5.
Patch embedding, MD-TPE once after it (two-sided per axis, added residually), pre-RMSNorm blocks of non-causal
LightNet attention (one global additive "scan": a softmax of the keys over all tokens, so the order in which
the grid is flattened does not matter) with MD-LRPE on the 2-D grid, and a GLU; final RMSNorm, mean pool,
linear head (the OpenNLPLab/im layout; no class token).

The baseline (spec §5, Vim arXiv 2401.09417 / VMamba arXiv 2401.10166 style) is the same model with
`MultiScanAttention` as the token mixer: a multiplicative per-channel decay, run as causal scans over 2 or 4
orders of the grid and summed. Without MD-TPE/MD-LRPE the non-causal LightNet mixer is position-blind (a
permutation of the patches permutes the tokens and leaves the pooled features unchanged); the multi-scan mixer
gets its positions from the scan orders.

Positions are defined for any grid (MD-LRPE angles and MD-TPE scans are computed from the input's grid), so
another resolution needs nothing resampled.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from ..errors import parse_enum
from ..layers.init import init_linear
from ..layers.lightnet import LightNetAttention, LightNetBlock, Lrpe, MdTpe, MixerInit, parse_lrpe
from ..layers.mixer import MixerKind, build_mixer, mixer_class, refuse_changed
from ..layers.norm import RMSNorm
from ..layers.patch_embed import PatchEmbed, PatchStem
from ..registry import register_model
from .classifier import EarlyExitMixin, LinearHeadMixin


class TpeDirection(str, Enum):
    """How MD-TPE scans each grid axis."""

    BIDIRECTIONAL = "bidirectional"  # two-sided λ^|Δ|
    CAUSAL = "causal"  # the author's one-sided scans (an arbitrary top-left bias on images)


class TokenMixerViT(EarlyExitMixin, LinearHeadMixin, nn.Module):
    """Isotropic classifier around an injectable token mixer: patches → [MD-TPE] → blocks → RMSNorm → mean → head.

    The shared body of `LightNetViT` and `MultiScanViT`; those two fix the mixer class and expose its options as
    plain constructor arguments (so a run directory can store them). Blocks are `LightNetBlock`s
    (`h + Mixer(RMSNorm(h))`, `h + GLU(RMSNorm(h))`); each forward passes the input's grid to the mixers and to
    the MD-TPE.

    Args:
        mixer (MixerKind | str | type[nn.Module]): the token mixer (`polyattn.layers.mixer`), built
            bidirectional over the patch grid.
        mixer_options (Mapping[str, Any]): the mixer's own constructor options (checked against it).
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads: as `VisionTransformer`.
        mlp_hidden_dim (int, Optional): GLU hidden width; None → `8·ceil(D/3)` (a ViT 4× MLP budget).
        use_tpe (bool): apply MD-TPE once after the patch embedding.
        tpe_direction (str): "bidirectional" (two-sided `λ^|Δ|` per axis) or "causal" (the author's one-sided
            scans, which give an arbitrary top-left bias on images).
        tpe_residual (bool): `x + MD-TPE(x)` (True) or `MD-TPE(x)` replacing the embedding (the author's LM code).
        drop_rate (float): dropout before the head.
        drop_path_rate (float): stochastic depth, rising linearly from 0 (first block) to this (last block).
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

    GLOBAL_POOLS = ("avg",)

    def __init__(
        self,
        *,
        mixer: MixerKind | str | type[nn.Module],
        mixer_options: Mapping[str, Any],
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden_dim: int | None = None,
        use_tpe: bool = True,
        tpe_direction: TpeDirection | Literal["bidirectional", "causal"] = "bidirectional",
        tpe_residual: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reversible: bool = False,
        early_exit: bool = False,
        exit_threshold: float = 1.0,
        stem: PatchStem | Literal["patch", "conv", "resnet"] = "patch",
    ):
        super().__init__()
        self.reversible = reversible
        tpe_direction = parse_enum(TpeDirection, tpe_direction, "tpe_direction")
        self.mixer = mixer  # as given: a MixerKind or a class
        self.num_classes, self.global_pool = num_classes, "avg"
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0  # mean-pool head: no class token

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, stem=stem)
        grid = self.patch_embed.grid_size
        causal_tpe = tpe_direction is TpeDirection.CAUSAL
        self.tpe = (MdTpe(embed_dim, num_heads, num_axes=2, causal=causal_tpe, residual=tpe_residual)
                    if use_tpe else None)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            LightNetBlock(embed_dim, build_mixer(mixer, embed_dim, num_heads, causal=False, grid_shape=grid,
                                                 **mixer_options),
                          mlp_hidden_dim=mlp_hidden_dim, drop_path=dpr[i])
            for i in range(depth)
        )
        self.norm = RMSNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_linear(self.head)
        self._init_early_exit(early_exit, exit_threshold, partial(RMSNorm, eps=1e-6), embed_dim,
                              reversible=reversible)

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay: MD-TPE's per-channel scales `q`, `k` (init 1) and decay logits.

        They are 2-D but not weight matrices: decaying them would pull the Toeplitz coefficients to 0 and every
        decay to λ = 0.5. Norm weights and biases are excluded by the optimiser's `ndim < 2` rule; there is no
        position table or class token.
        """
        return {"tpe.q", "tpe.k", "tpe.decay_logit"} if self.tpe is not None else set()

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Images → the patch tokens the blocks read `[B, N, D]` and the blocks' keyword arguments (the grid)."""
        grid = self.patch_embed.grid_for(tuple(x.shape[-2:]))
        x = self.patch_embed(x)  # (B, N, D)
        if self.tpe is not None:
            x, _ = self.tpe(x, grid_shape=grid)
        return x, dict(grid_shape=grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` → normalised patch tokens `[B, N, D]` in raster order."""
        return self._features(*self._tokens(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens `[B, N, D]` → mean-pooled features `[B, D]` (`pre_logits`) or logits `[B, num_classes]`."""
        x = self.head_drop(x.mean(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, *, all_exits: bool = False) -> torch.Tensor:
        """Images → logits `[B, C]`; with `all_exits` (an `early_exit` model) every exit's, `[depth, B, C]`."""
        return self._forward(x, all_exits)


class LightNetViT(TokenMixerViT):
    """LightNet image classifier (arXiv 2405.21022): non-causal LightNet attention + MD-LRPE + MD-TPE.

    Parameters (`D` width, `H` heads, `L` depth, `P` patch side, `C` classes, GLU hidden `h = 8·ceil(D/3)` unless
    given, gate rank `r = D/H`; MD-LRPE has no parameters):

        patch conv           3P²D + D
        MD-TPE (2 axes)      2·(D² + 3D + H)          q, k, norm weight (D each), decay logits (H), W_o (D²)
        per block            4D² + 2Dr + D + 2D + 3Dh  q/k/v/o, low-rank gate, per-head norm, 2 RMSNorms, GLU
        final norm + head    D + DC + C

    e.g. `lightnet_vision_tiny` (D=192, H=3, L=12, P=16, C=1000): 6,025,966.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_hidden_dim, use_tpe,
            tpe_direction, tpe_residual, drop_rate, drop_path_rate, reversible, early_exit, exit_threshold, stem:
            see `TokenMixerViT`.
        lrpe (str, Optional): "cosine" (d → 2d, the default), "rotary" or None (no relative positions).
        scale (float, Optional): output scale of the attention core; 1.0 (the author's) or None for d^-0.5.
        init (str): "default" (trunc-normal 0.02) or "author" (Xavier gain 0.01, zero output projections).
        mixer (MixerKind | str | type): the token mixer; "lightnet" (default) or another (`polyattn.layers.mixer`),
            e.g. a kernelized linear attention ("linear_elu", "performer", ...), with MD-TPE as its positions;
            `lrpe`, `scale` and `init` are LightNet's and then stay at their defaults.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden_dim: int | None = None,
        use_tpe: bool = True,
        tpe_direction: TpeDirection | Literal["bidirectional", "causal"] = "bidirectional",
        tpe_residual: bool = True,
        lrpe: Lrpe | Literal["cosine", "rotary"] | None = "cosine",
        scale: float | None = 1.0,
        init: MixerInit | Literal["default", "author"] = "default",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mixer: MixerKind | str | type[nn.Module] = "lightnet",
        reversible: bool = False,
        early_exit: bool = False,
        exit_threshold: float = 1.0,
        stem: PatchStem | Literal["patch", "conv", "resnet"] = "patch",
    ):
        mixer = mixer if isinstance(mixer, type) else parse_enum(MixerKind, mixer, "mixer")
        if mixer_class(mixer) is LightNetAttention:
            options = dict(lrpe=parse_lrpe(lrpe), scale=scale, init=init)
        else:
            refuse_changed(type(self).__name__, mixer, "LightNet", lrpe=(parse_lrpe(lrpe), Lrpe.COSINE),
                           scale=(scale, 1.0), init=(parse_enum(MixerInit, init, "init"), MixerInit.DEFAULT))
            options = {}
        super().__init__(
            mixer=mixer,
            mixer_options=options,
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_hidden_dim=mlp_hidden_dim, use_tpe=use_tpe,
            tpe_direction=tpe_direction, tpe_residual=tpe_residual, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, reversible=reversible, early_exit=early_exit,
            exit_threshold=exit_threshold, stem=stem,
        )


class MultiScanViT(TokenMixerViT):
    """The multiplicative multi-scan baseline (spec §5): `LightNetViT` with `MultiScanAttention` as the mixer.

    Each block runs causal decayed scans over `directions` orders of the patch grid (2: raster order forward and
    backward, as Vim; 4: also column order both ways, VMamba's cross-scan) and sums them. No MD-TPE by default,
    since the scans already carry position; no LRPE (the layer has none).

    Parameters: as `LightNetViT` without MD-TPE, plus per block the low-rank decay projection
    `n_f·(2Dr + D)` with `r = D/H`, where `n_f = 1` (decay shared by the directions, the default) or
    `directions` (`per_direction_decay=True`). With shared decays the 2- and 4-scan models have equal counts.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_hidden_dim, use_tpe,
            tpe_direction, tpe_residual, drop_rate, drop_path_rate, reversible, early_exit, exit_threshold, stem:
            see `TokenMixerViT`.
        directions (int): 1, 2 or 4 scan orders. Default: 4.
        divide (bool): average the directions instead of summing (Vim's "div2"). Default: False.
        per_direction_decay (bool): a separate decay projection per direction. Default: False (shared).
        scale (float, Optional): query scale; None → d^-0.5.
        init (str): "default" or "author", as `LightNetViT`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden_dim: int | None = None,
        directions: Literal[1, 2, 4] = 4,
        divide: bool = False,
        per_direction_decay: bool = False,
        use_tpe: bool = False,
        tpe_direction: TpeDirection | Literal["bidirectional", "causal"] = "bidirectional",
        tpe_residual: bool = True,
        scale: float | None = None,
        init: MixerInit | Literal["default", "author"] = "default",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reversible: bool = False,
        early_exit: bool = False,
        exit_threshold: float = 1.0,
        stem: PatchStem | Literal["patch", "conv", "resnet"] = "patch",
    ):
        if directions not in (1, 2, 4):
            raise ValueError(f"directions must be 1, 2 or 4, got {directions!r}")
        super().__init__(
            mixer=MixerKind.MULTISCAN,
            mixer_options=dict(directions=directions, divide=divide, per_direction_decay=per_direction_decay,
                              scale=scale, init=init),
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_hidden_dim=mlp_hidden_dim, use_tpe=use_tpe,
            tpe_direction=tpe_direction, tpe_residual=tpe_residual, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, reversible=reversible, early_exit=early_exit,
            exit_threshold=exit_threshold, stem=stem,
        )



# Same sizes as the ViT/DeiT baseline (spec §3.4), so that rows of the comparison differ only in the token mixer.

@register_model(LightNetViT, task="classification")
def lightnet_vision_nano():
    """LightNet-vision with D=128, 6 blocks, 4 heads: a CPU-sized model (as vit_nano)."""
    return dict(embed_dim=128, depth=6, num_heads=4)


@register_model(LightNetViT, task="classification")
def lightnet_vision_tiny():
    """LightNet-vision with D=192, 12 blocks, 3 heads (ViT-Ti sizes); 6.03M parameters at 224 px."""
    return dict(embed_dim=192, depth=12, num_heads=3)


@register_model(LightNetViT, task="classification")
def lightnet_vision_small():
    """LightNet-vision with D=384, 12 blocks, 6 heads (ViT-S sizes); 22.8M parameters at 224 px."""
    return dict(embed_dim=384, depth=12, num_heads=6)


@register_model(LightNetViT, task="classification")
def lightnet_vision_base():
    """LightNet-vision with D=768, 12 blocks, 12 heads (ViT-B sizes); 88.7M parameters at 224 px."""
    return dict(embed_dim=768, depth=12, num_heads=12)


@register_model(MultiScanViT, task="classification")
def multiscan_vision_nano():
    """Multiplicative 4-scan baseline with D=128, 6 blocks, 4 heads: a CPU-sized model (as vit_nano)."""
    return dict(embed_dim=128, depth=6, num_heads=4)


@register_model(MultiScanViT, task="classification")
def multiscan_vision_tiny():
    """Multiplicative 4-scan baseline with D=192, 12 blocks, 3 heads (ViT-Ti sizes)."""
    return dict(embed_dim=192, depth=12, num_heads=3)


@register_model(MultiScanViT, task="classification")
def multiscan_vision_small():
    """Multiplicative 4-scan baseline with D=384, 12 blocks, 6 heads (ViT-S sizes)."""
    return dict(embed_dim=384, depth=12, num_heads=6)


@register_model(MultiScanViT, task="classification")
def multiscan_vision_base():
    """Multiplicative 4-scan baseline with D=768, 12 blocks, 12 heads (ViT-B sizes)."""
    return dict(embed_dim=768, depth=12, num_heads=12)


@register_model(LightNetViT, task="classification")
def linear_vision_nano():
    """Kernelized linear attention (elu+1; `model.mixer=performer|cosformer|hedgehog|linear_relu`) in the
    LightNet-vision body with MD-TPE, D=128, 6 blocks, 4 heads."""
    return dict(embed_dim=128, depth=6, num_heads=4, mixer="linear_elu", lrpe="cosine")
