"""Kernelized linear attention as a token mixer (`polyattn.ops.linear_attn`; arXiv 2006.16236 and successors).

`q, k, v = W_q x, W_k x, W_v x` per head, `o = φ(q)ᵀ S / (φ(q)ᵀ z + eps)` with the feature map φ chosen by
`feature_map` (`polyattn.ops.linear_attn.FeatureMap`), then `W_o`. Causal layers decode with a `LinearAttnCache`
(the running sums and the real-token count, which cosFormer's re-weighting needs as the position). The call
form is the token-mixer interface of `polyattn.layers.mixer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..errors import UserError, parse_enum
from ..ops.checks import check_features, check_mask
from ..ops.linear_attn import FeatureMap, LinearAttnState, feature_map_fn, linear_attn, orthogonal_gaussian
from ..ops.sequence import real_counts, real_positions
from .init import init_linear
from .mixer_hooks import call_op


class LinearAttnCache(NamedTuple):
    """Decoding state of one `LinearAttention` layer: `S [B, H, F, Dv]`, `z [B, H, F]` float32, and `offset [B]`
    int64, the real tokens seen so far (the position of the next one)."""

    S: torch.Tensor
    z: torch.Tensor
    offset: torch.Tensor


def random_feature_layers(model: nn.Module) -> list[LinearAttention]:
    """The layers of `model` whose feature map has random features (Performer's FAVOR+), in module order."""
    return [m for m in model.modules() if isinstance(m, LinearAttention) and m.feature_map is FeatureMap.FAVOR]


def redraw_random_features(model: nn.Module, seed: int) -> int:
    """Draws new random features for every Performer layer of `model` from one generator seeded with `seed`, so
    processes of a distributed run, and a model and its averaged copy, given the same seed draw the same features.
    Returns the number of layers redrawn."""
    generator = torch.Generator().manual_seed(seed)
    layers = random_feature_layers(model)
    for layer in layers:
        layer.redraw_features(generator)
    return len(layers)


class LinearAttention(nn.Module):
    """Multi-head kernelized linear attention.

    Args:
        dim: model width D.
        num_heads: H; head dim d = D / H.
        causal: running sums over the prefix (LMs; decodes with a cache) or one global sum (encoders, images).
        feature_map: `FeatureMap` or its string: "elu" (elu+1), "relu", "favor" (Performer), "cosformer",
            "hedgehog" (learnable).
        num_features: random features m of "favor" and the width m of "hedgehog"'s map; None → d.
        max_len: cosFormer's horizon M (positions beyond it wrap the re-weighting); "cosformer" only.
        chunk_size: chunk length of the causal form (changes only round-off).
        eps: added to the normaliser.

    Options of one feature map are refused with another (`num_features` and `max_len`).
    """

    BUILD_ARGS: ClassVar[tuple[str, ...]] = ("causal",)
    """Constructor arguments that `build` sets (see `polyattn.layers.mixer`)."""

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, feature_map: FeatureMap | str = "elu",
                 num_features: int | None = None, max_len: int | None = None, chunk_size: int = 64,
                 eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.feature_map = parse_enum(FeatureMap, feature_map, "feature_map")
        if num_features is not None and self.feature_map not in (FeatureMap.FAVOR, FeatureMap.HEDGEHOG):
            raise UserError(f"num_features sizes the 'favor' and 'hedgehog' feature maps, not "
                            f"{self.feature_map.value!r}; drop it.")
        if max_len is not None and self.feature_map is not FeatureMap.COSFORMER:
            raise UserError(f"max_len is cosFormer's horizon, not used by {self.feature_map.value!r}; drop it.")
        self.dim, self.num_heads, self.causal = dim, num_heads, causal
        self.head_dim = d = dim // num_heads
        self.chunk_size, self.eps = chunk_size, eps
        self.max_len = max_len or 4096
        m = num_features or d
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_linear(proj)
        if self.feature_map is FeatureMap.FAVOR:
            # a buffer, saved with the weights: a checkpoint decodes with the features it was trained with
            self.register_buffer("projection", orthogonal_gaussian(m, d))
        elif self.feature_map is FeatureMap.HEDGEHOG:
            self.projection = nn.Parameter(torch.eye(d, m).repeat(num_heads, 1, 1))  # starts as softmax(±x)
        else:
            self.projection = None

    @classmethod
    def build(cls, dim: int, num_heads: int, *, causal: bool, grid_shape: Sequence[int] | None = None,
              **options) -> LinearAttention:
        """The token-mixer constructor (`polyattn.layers.mixer`); positions are the token order, no grid."""
        return cls(dim, num_heads, causal=causal, **options)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Performer's redraw (arXiv 2009.14794 §4.3): new random features, called between training steps by the
        code that trains the model (never inside forward)."""
        if self.feature_map is not FeatureMap.FAVOR:
            raise UserError(f"only the 'favor' feature map has random features to redraw, not "
                            f"{self.feature_map.value!r}.")
        m, d = self.projection.shape
        self.projection.copy_(orthogonal_gaussian(m, d, generator=generator).to(self.projection))

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                cache: LinearAttnCache | None = None, use_cache: bool = False,
                grid_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, LinearAttnCache | None]:
        """`x [B, T, D]` → `(o [B, T, D], cache)`, the token-mixer call form (`polyattn.layers.mixer`)."""
        check_features("LinearAttention", x, self.dim, "x")
        check_mask("LinearAttention", key_padding_mask, *x.shape[:2], "key_padding_mask")
        want_state = use_cache or cache is not None
        if want_state and not self.causal:
            raise ValueError("a decoding state needs a causal layer")
        B, T, _ = x.shape
        H, d = self.num_heads, self.head_dim
        mask = None if key_padding_mask is None else key_padding_mask.bool()
        q = self.q_proj(x).view(B, T, H, d) * d**-0.25  # the softmax kernel's 1/√d, split between q and k
        k = self.k_proj(x).view(B, T, H, d) * d**-0.25
        v = self.v_proj(x).view(B, T, H, d)
        start = 0 if cache is None else cache.offset  # real tokens before this call, per row
        positions = None
        if self.feature_map is FeatureMap.COSFORMER:  # positions count real tokens, continuing the cache's
            positions = real_positions(mask, T, start=start, batch_size=B, device=x.device)
        phi = feature_map_fn(self.feature_map, projection=self.projection, max_len=self.max_len)
        state = None if cache is None else LinearAttnState(cache.S, cache.z)
        o, new_state = call_op(self, linear_attn, phi(q, positions), phi(k, positions), v, causal=self.causal,
                               initial_state=state, output_final_state=want_state and self.causal, mask=mask,
                               chunk_size=self.chunk_size, eps=self.eps)
        o = self.o_proj(o.reshape(B, T, H * o.shape[-1]))
        if not want_state:
            return o, None
        seen = real_counts(mask, T, batch_size=B, device=x.device) + start
        return o, LinearAttnCache(new_state.S, new_state.z, seen)

    def num_features(self) -> int:
        """F, the width of φ: d (elu, relu), m (favor), 2d (cosformer), 2m (hedgehog)."""
        if self.feature_map in (FeatureMap.ELU, FeatureMap.RELU):
            return self.head_dim
        if self.feature_map is FeatureMap.COSFORMER:
            return 2 * self.head_dim
        m = self.projection.shape[0] if self.feature_map is FeatureMap.FAVOR else self.projection.shape[-1]
        return m if self.feature_map is FeatureMap.FAVOR else 2 * m

    def state_size(self) -> int:
        """Floats per sequence in the decoding state: `S` (H·F·d) + `z` (H·F) + the position counter."""
        return self.num_heads * (self.num_features() * self.head_dim + self.num_features()) + 1

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}, feature_map={self.feature_map.value}"
