"""DiT: a class-conditional diffusion transformer whose token mixer is a constructor choice.

DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748 (facebookresearch/DiT
`models.py`). LightNet as the token mixer: arXiv 2405.21022, spec shared/reference/lightnet.md §3.4 (the
`LightNetDiT` row: non-causal LightNet attention, MD-LRPE + MD-TPE, DiT head and adaLN-Zero unchanged).

Images `[B, C, H, W]` → non-overlapping p×p patches → tokens `[B, N, D]` plus a fixed 2-D sin-cos position table
(→ MD-TPE once, for the LightNet mixer) → `depth` DiT blocks conditioned on `c = t_emb(t) + y_emb(y)` → a final
adaLN + linear layer → unpatchify to the input's shape. Each block is

    shift₁, scale₁, gate₁, shift₂, scale₂, gate₂ = Linear(SiLU(c))          (adaLN-Zero, zero-initialised)
    x ← x + gate₁ · Mixer(LayerNorm(x) · (1 + scale₁) + shift₁)
    x ← x + gate₂ · MLP(LayerNorm(x) · (1 + scale₂) + shift₂)

with LayerNorms without affine parameters. Every gate and the final linear layer start at zero, so a new model
is the identity on its tokens and predicts exactly 0 ("adaLN-Zero", the paper's best conditioning).

The mixer is any token mixer of `polyattn.layers.mixer`, built bidirectional over the patch grid: `"softmax"`
(multi-head softmax attention with qkv biases, the DiT baseline), `"lightnet"` (non-causal LightNet attention with
MD-LRPE on the patch grid, and MD-TPE once after the patch embedding), `"multiscan"`, the kernelized linear
attentions (`"linear_elu"`, `"performer"`, ...), or a mixer class. Everything
else (MLP, norms, modulation, head, initialisation) is the same for all, so a comparison changes only the token
mixer.

Conditioning (`conditioning=`, the three variants the DiT paper compares in §3.2 / Fig. 5; `DiTConditioning`):

- `adaln_zero` (default, above): `c = t_emb(t) + y_emb(y)` modulates every block.
- `cross_attention`: the class and timestep embeddings are two condition tokens `[y_emb(y), t_emb(t)]`, and each
  block (pre-LayerNorm, no modulation) adds a multi-head cross-attention to them after its token mixer. The class
  token's keys/values do not depend on the noisy image or the step, so `encode_condition(y)` projects them once
  per image and a sampler passes them as `condition=` to every step and both guidance branches; each step then
  projects its one timestep token only (`forward` without `condition` computes the same in one go).
- `in_context`: the two condition tokens are prepended to the patch tokens of standard pre-norm blocks and dropped
  after the last one (their keys change with the image in every layer: nothing to reuse).

The non-adaLN variants end in a LayerNorm and a zero-initialised linear layer, so they too start by predicting 0.

The timestep is continuous, `t ∈ [0, 1]`; its sinusoidal embedding is taken of `1000·t`, DiT's range of integer
DDPM steps. Class `num_classes` is the null label of classifier-free guidance (arXiv 2207.12598).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from functools import partial
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from ..errors import parse_enum
from ..layers.attention import Attention, KVCache
from ..layers.lightnet import LightNetAttention, Lrpe, MdTpe, parse_lrpe
from ..layers.mixer import MixerKind, build_mixer, mixer_class, refuse_changed
from ..layers.mlp import Mlp
from ..layers.patch_embed import PatchEmbed, to_2tuple
from ..layers.pos_embed import sincos_pos_embed
from ..layers.reversible import reversible_blocks
from ..registry import register_model

TIME_SCALE = 1000.0
"""t ∈ [0, 1] is embedded as DiT's integer step 1000·t."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x · (1 + scale) + shift`, with `shift`, `scale` `[B, D]` broadcast over the tokens of `x` `[B, N, D]`."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[B, dim]` of (possibly fractional) timesteps `t` `[B]`: `[cos(t·ω), sin(t·ω)]`,
    `ω_i = max_period^(−i/(dim/2))` (DiT's `TimestepEmbedder.timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """`t` `[B]` in [0, 1] → `[B, D]`: sinusoidal features of `1000·t`, then Linear → SiLU → Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t * TIME_SCALE, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class DiTPosEmbed(str, Enum):
    """The absolute positions added after the patch embedding."""

    SINCOS = "sincos"  # DiT's fixed 2-D sin-cos table
    NONE = "none"  # none (LightNet then relies on MD-LRPE/MD-TPE alone)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (see the module docstring) around a token mixer (any
    `polyattn.layers.mixer` mixer, called as `mixer(x, grid_shape=grid)`)."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # Held as `mixer.layer` (state-dict keys `blocks.i.mixer.layer.*`), the name it had in checkpoints written
        # before mixers shared one interface.
        self.mixer = nn.ModuleDict({"layer": mixer})
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
        """x `[B, N, D]`, c `[B, D]` → `[B, N, D]`."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 × (B, D)
        o, _ = self.mixer["layer"](modulate(self.norm1(x), shift1, scale1), grid_shape=grid_shape)
        x = x + gate1.unsqueeze(1) * o
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def mixer_branch(self, x: torch.Tensor, c: torch.Tensor, grid_shape: Sequence[int]) -> tuple[torch.Tensor, None]:
        """The gated, modulated mixer branch and no state, for a reversible stack (`polyattn.layers.reversible`)."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(6, dim=-1)[:3]
        o, _ = self.mixer["layer"](modulate(self.norm1(x), shift, scale), grid_shape=grid_shape)
        return gate.unsqueeze(1) * o, None

    def mlp_branch(self, x: torch.Tensor, c: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
        """The gated, modulated MLP branch, for a reversible stack."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(6, dim=-1)[3:]
        return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))


class DiTTokenBlock(nn.Module):
    """A pre-LayerNorm block without modulation, for the `cross_attention` and `in_context` conditionings:
    `x + Mixer(LN(x))`, then (with `cross_attention`) `x + CrossAttn(LN(x), condition tokens)`, then
    `x + MLP(LN(x))`."""

    entry_methods = ("encode_condition",)
    """What the model calls besides `forward`: the conditioning's keys/values are encoded apart from the block's
    pass, so a wrapper of the block's calls (FSDP gathering its parameters) must wrap this one too."""

    def __init__(self, dim: int, mixer: nn.Module, num_heads: int, mlp_ratio: float = 4.0,
                 cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mixer = nn.ModuleDict({"layer": mixer})  # `mixer.layer`, as in `DiTBlock`
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.norm_context = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, num_heads, qkv_bias=True, proj_bias=True)
        else:
            self.cross = None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))

    def encode_condition(self, tokens: torch.Tensor) -> KVCache:
        """Keys/values `[B, S, H, D/H]` of condition tokens `[B, S, D]` for the cross-attention."""
        return self.cross.encode_context(self.norm_context(tokens))

    def forward(self, x: torch.Tensor, condition: KVCache | None, grid_shape: Sequence[int]) -> torch.Tensor:
        """x `[B, N, D]`, the condition tokens' keys/values (cross-attention) → `[B, N, D]`."""
        x = x + self.mixer["layer"](self.norm1(x), grid_shape=grid_shape)[0]
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context=condition)[0]
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) → Linear to `p·p·C_out` values per token; both zero-initialised. With
    `adaptive=False` (the conditionings without adaLN) a LayerNorm with affine parameters replaces the adaLN."""

    def __init__(self, dim: int, patch_size: tuple[int, int], out_chans: int, adaptive: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size[0] * patch_size[1] * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if adaptive else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            return self.linear(self.norm(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p·p·C_out)


_MIXER_OPTIONS: dict[type[nn.Module], dict] = {Attention: {"qkv_bias": True, "proj_bias": True}}
"""DiT's own choices for a mixer: softmax attention with qkv and output biases (DiT's `Attention(qkv_bias=True)`)."""


class DiTConditioning(str, Enum):
    """How the class and the timestep enter the model (module docstring; DiT §3.2)."""

    ADALN_ZERO = "adaln_zero"
    CROSS_ATTENTION = "cross_attention"
    IN_CONTEXT = "in_context"



class DiT(nn.Module):
    """Class-conditional diffusion transformer (arXiv 2212.09748) with a softmax or LightNet token mixer.

    `forward(x, t, y, *, condition=None)`: with the `cross_attention` conditioning, `condition` is what
    `encode_condition(y)` returned for the same rows (then `y` is not read), reused across sampler steps.

    `forward(x [B, C, H, W], t [B] in [0, 1], y [B] int64 | None) → [B, C_out, H, W]` (C_out = C unless given):
    the task decides what the output means (`polyattn.tasks.diffusion` trains it as a flow velocity). `y` holds
    class indices in `[0, num_classes]`; `num_classes` (or `y=None`) is the null label of classifier-free guidance.

    Parameters (`D` width, `L` depth, `P` patch side, `C`/`C_out` channels, `K` classes, MLP hidden `h = r·D`):

        patch conv              P²·C·D + D
        time MLP                256·D + D + D² + D
        class table             (K + 1)·D
        per block               mixer + 2Dh + h + D (MLP) + 6D² + 6D (adaLN)
          softmax mixer         4D² + 4D
          lightnet mixer        4D² + 2D·(D/H) + D        (q/k/v/o, low-rank gate, per-head norm)
        MD-TPE (lightnet)       2·(D² + 3D + H)
        final layer             2D² + 2D + D·P²·C_out + P²·C_out

    With DiT's latent setting (32×32×4 input, C_out = 8 for the learned variance, K = 1000) the softmax model has
    DiT's published counts less the fixed position table, which DiT stores as a frozen parameter and this model as
    a buffer: e.g. DiT-XL/2 675,129,632 − 294,912.

    Args:
        img_size: image side (or (H, W)) the position table and patch grid are built for.
        patch_size: patch side p (or (ph, pw)); DiT's "/2" models use 2.
        in_chans: image channels C.
        out_chans: output channels; None → `in_chans` (DiT's learned-variance models use 2·C).
        num_classes: K classes; K is the null label (K = 0: unconditional, only the null label).
        embed_dim, depth, num_heads: width D, blocks L, heads H.
        mlp_ratio: MLP hidden width / D (DiT: 4).
        mixer: a `MixerKind` or its string, "softmax" (DiT, with qkv biases), "lightnet" (non-causal LightNet
            attention with MD-LRPE), "multiscan", a kernelized linear attention ("linear_elu", "linear_relu",
            "performer", "cosformer", "hedgehog"), or a token-mixer class (`polyattn.layers.mixer`).
        lrpe: LightNet only: "cosine", "rotary" or None (no MD-LRPE).
        use_tpe: LightNet only: MD-TPE (two-sided per axis, residual) once after the patch embedding.
        pos_embed: `DiTPosEmbed`: "sincos" (DiT's fixed 2-D table) or "none" (LightNet then relies on
            MD-LRPE/MD-TPE alone).
        reversible: run the blocks as a reversible stack (`polyattn.layers.reversible`: two coupled residual
            streams, activations recomputed in backward, training memory flat in depth).
        conditioning: "adaln_zero" (DiT's best, the default), "cross_attention" or "in_context" (module
            docstring).

    `lrpe` and `use_tpe` at any value but their default with another mixer than LightNet are an error: they
    would change nothing.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 2,
        in_chans: int = 3,
        out_chans: int | None = None,
        num_classes: int = 10,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        mixer: MixerKind | str | type[nn.Module] = "softmax",
        lrpe: Lrpe | Literal["cosine", "rotary"] | None = "cosine",
        use_tpe: bool = True,
        pos_embed: DiTPosEmbed | Literal["sincos", "none"] = "sincos",
        reversible: bool = False,
        conditioning: DiTConditioning | str = "adaln_zero",
    ):
        super().__init__()
        self.reversible = reversible
        self.conditioning = parse_enum(DiTConditioning, conditioning, "conditioning")
        if reversible and self.conditioning is not DiTConditioning.ADALN_ZERO:
            raise ValueError("reversible=True couples the adaLN-Zero blocks; the cross_attention and in_context "
                             "conditionings have no reversible form, so set conditioning=adaln_zero")
        mixer = mixer if isinstance(mixer, type) else parse_enum(MixerKind, mixer, "mixer")
        mixer_cls = mixer_class(mixer)
        lrpe = parse_lrpe(lrpe)
        pos_embed = parse_enum(DiTPosEmbed, pos_embed, "pos_embed")
        lightnet = mixer_cls is LightNetAttention
        if not lightnet:
            refuse_changed("DiT", mixer, "LightNet", lrpe=(lrpe, Lrpe.COSINE), use_tpe=(use_tpe, True))
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.in_chans, self.out_chans = in_chans, out_chans or in_chans
        self.num_classes, self.embed_dim, self.mixer = num_classes, embed_dim, mixer

        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        table = sincos_pos_embed(grid, embed_dim)[None] if pos_embed is DiTPosEmbed.SINCOS else None  # (1, N, D)
        self.register_buffer("pos_embed", table, persistent=False)
        self.tpe = (MdTpe(embed_dim, num_heads, num_axes=2, causal=False, residual=True)
                    if lightnet and use_tpe else None)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = nn.Embedding(num_classes + 1, embed_dim)  # row num_classes: the null label
        options = _MIXER_OPTIONS.get(mixer_cls, {})
        if lightnet:
            options = {**options, "lrpe": lrpe}
        adaln = self.conditioning is DiTConditioning.ADALN_ZERO
        if adaln:
            self.blocks = nn.ModuleList(
                DiTBlock(embed_dim, build_mixer(mixer_cls, embed_dim, num_heads, causal=False, grid_shape=grid,
                                                **options), mlp_ratio)
                for _ in range(depth)
            )
        else:
            in_context = self.conditioning is DiTConditioning.IN_CONTEXT
            if in_context and lightnet:  # the condition tokens lead the grid, at MD-LRPE angle 0
                options = {**options, "num_special": self.NUM_CONDITION_TOKENS}
            self.blocks = nn.ModuleList(
                DiTTokenBlock(embed_dim, build_mixer(mixer_cls, embed_dim, num_heads, causal=False, grid_shape=grid,
                                                     **options), num_heads, mlp_ratio, cross_attention=not in_context)
                for _ in range(depth)
            )
        self.final_layer = FinalLayer(embed_dim, self.patch_size, self.out_chans, adaptive=adaln)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero biases (the patch conv as a linear), N(0, 0.02)
        for the class table and the time MLP, and zeros for every adaLN modulation and the final linear layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks if isinstance(b, DiTBlock)] + [self.final_layer.linear]
        if self.final_layer.adaLN_modulation is not None:
            zeroed.append(self.final_layer.adaLN_modulation[-1])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def no_weight_decay(self) -> set[str]:
        """MD-TPE's per-channel scales and decay logits (2-D, but not weight matrices); see `LightNetViT`."""
        return {"tpe.q", "tpe.k", "tpe.decay_logit"} if self.tpe is not None else set()

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens `[B, h·w, ph·pw·C]` (raster order) → images `[B, C, h·ph, w·pw]`."""
        (ph, pw), (h, w) = self.patch_size, grid
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=ph, q=pw)

    NUM_CONDITION_TOKENS = 2
    """The condition tokens of `cross_attention` and `in_context`: `[y_emb(y), t_emb(t)]`."""

    def _labels(self, y: torch.Tensor | None, B: int, device) -> torch.Tensor:
        return torch.full((B,), self.num_classes, dtype=torch.long, device=device) if y is None else y

    def encode_condition(self, y: torch.Tensor | None, batch_size: int | None = None) -> tuple[KVCache, ...] | None:
        """What `forward(..., condition=)` reuses for the rows of `y [B]` (None: `batch_size` null labels): with
        `cross_attention`, each block's keys/values of the class token, which no sampler step changes; None for
        the other conditionings (nothing in them is independent of the image)."""
        if self.conditioning is not DiTConditioning.CROSS_ATTENTION:
            return None
        device = self.y_embedder.weight.device
        y_tok = self.y_embedder(self._labels(y, batch_size or 1, device))[:, None]  # (B, 1, D)
        return tuple(block.encode_condition(y_tok) for block in self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                condition: tuple[KVCache, ...] | None = None) -> torch.Tensor:
        """x `[B, C, H, W]`, t `[B]` (or a scalar) in [0, 1], y `[B]` class indices (None: the null label);
        `condition` from `encode_condition` (cross-attention conditioning only)."""
        B = x.shape[0]
        grid = self.patch_embed.grid_for(tuple(x.shape[-2:]))
        h = self.patch_embed(x)  # (B, N, D)
        if self.pos_embed is not None:
            pos = self.pos_embed if grid == self.patch_embed.grid_size else \
                sincos_pos_embed(grid, self.embed_dim).to(h.device)[None]
            h = h + pos.to(h.dtype)
        if self.tpe is not None:
            h, _ = self.tpe(h, grid_shape=grid)
        t_emb = self.t_embedder(torch.as_tensor(t, device=x.device).expand(B))  # (B, D)
        if self.conditioning is DiTConditioning.ADALN_ZERO:
            if condition is not None:
                raise ValueError("condition= is for the cross_attention conditioning; adaln_zero takes y")
            c = t_emb + self.y_embedder(self._labels(y, B, x.device))  # (B, D)
            if self.reversible:
                h = reversible_blocks(self.blocks, h, c=c, grid_shape=grid)
            else:
                for block in self.blocks:
                    h = block(h, c, grid)
            return self.unpatchify(self.final_layer(h, c), grid)  # (B, C_out, H, W)
        if self.conditioning is DiTConditioning.IN_CONTEXT:
            if condition is not None:
                raise ValueError("condition= is for the cross_attention conditioning; in_context takes y")
            tokens = torch.stack((self.y_embedder(self._labels(y, B, x.device)), t_emb), 1).to(h.dtype)
            h = torch.cat((tokens, h), 1)  # (B, 2 + N, D)
            for block in self.blocks:
                h = block(h, None, grid)
            h = h[:, self.NUM_CONDITION_TOKENS:]
        else:  # cross-attention to [y token, t token]; the y token's keys/values may come encoded
            if condition is None:
                condition = self.encode_condition(self._labels(y, B, x.device))
            elif y is not None:
                raise ValueError("pass y or the condition encoded from it, not both")
            for block, y_kv in zip(self.blocks, condition):
                t_kv = block.encode_condition(t_emb[:, None].to(h.dtype))
                h = block(h, y_kv.append(t_kv.k, t_kv.v), grid)
        return self.unpatchify(self.final_layer(h, None), grid)


# DiT sizes (arXiv 2212.09748 Table 1; spec §3.4): S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16, and two
# CPU sizes. Defaults: 32 px RGB, 2×2 patches (a 16×16 grid), 10 classes; the token mixer is `model.mixer`.

@register_model(DiT, task="diffusion")
def dit_nano():
    """DiT with D=128, 6 blocks, 4 heads: a CPU-sized model (as vit_nano)."""
    return dict(embed_dim=128, depth=6, num_heads=4)


@register_model(DiT, task="diffusion")
def dit_tiny():
    """DiT with D=192, 12 blocks, 3 heads (ViT-Ti sizes)."""
    return dict(embed_dim=192, depth=12, num_heads=3)


@register_model(DiT, task="diffusion")
def dit_small():
    """DiT-S: D=384, 12 blocks, 6 heads (DiT-S/2 at the default 32 px, 2x2 patches)."""
    return dict(embed_dim=384, depth=12, num_heads=6)


@register_model(DiT, task="diffusion")
def dit_base():
    """DiT-B: D=768, 12 blocks, 12 heads (DiT-B/2 at the default 32 px, 2x2 patches)."""
    return dict(embed_dim=768, depth=12, num_heads=12)


@register_model(DiT, task="diffusion")
def dit_large():
    """DiT-L: D=1024, 24 blocks, 16 heads."""
    return dict(embed_dim=1024, depth=24, num_heads=16)


@register_model(DiT, task="diffusion")
def dit_xl():
    """DiT-XL: D=1152, 28 blocks, 16 heads."""
    return dict(embed_dim=1152, depth=28, num_heads=16)
