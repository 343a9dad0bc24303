"""nn.Modules that compose the ops and own parameters: attention, LightNet, positions, norms, MLPs, blocks.

Every layer takes `[B, T, D]` tokens (or `[B, C, H, W]` images for `PatchEmbed`); layers that decode token by
token take and return their cache explicitly. Build your own model from these (see `examples/`).
"""

from .attention import Attention, KVCache, parse_mask_mode
from .block import TransformerBlock
from .drop import DropPath, drop_path
from .init import init_linear
from .kv_int8 import Int8KVCache, int8_kv_cache
from .lightnet import LightNetAttention, LightNetBlock, LightNetCache, MdTpe, MultiScanAttention
from .mlp import GatedMlp, Mlp, llama_hidden_size
from .norm import GroupRMSNorm, RMSNorm
from .patch_embed import PatchEmbed, to_2tuple
from .pos_embed import LearnedPosEmbed, resample_abs_pos_embed, sincos_pos_embed
from .rope import (
    Rotary,
    RotaryEmbedding,
    RotaryEmbeddingND,
    apply_rotary,
    axial_frequencies,
    grid_positions,
    positions_from_padding,
)
from .token_io import TokenIO

__all__ = [
    "Attention",
    "DropPath",
    "GatedMlp",
    "GroupRMSNorm",
    "Int8KVCache",
    "KVCache",
    "LearnedPosEmbed",
    "LightNetAttention",
    "LightNetBlock",
    "LightNetCache",
    "MdTpe",
    "Mlp",
    "MultiScanAttention",
    "PatchEmbed",
    "RMSNorm",
    "Rotary",
    "RotaryEmbedding",
    "RotaryEmbeddingND",
    "TokenIO",
    "TransformerBlock",
    "apply_rotary",
    "axial_frequencies",
    "drop_path",
    "grid_positions",
    "init_linear",
    "int8_kv_cache",
    "llama_hidden_size",
    "parse_mask_mode",
    "positions_from_padding",
    "resample_abs_pos_embed",
    "sincos_pos_embed",
    "to_2tuple",
]
