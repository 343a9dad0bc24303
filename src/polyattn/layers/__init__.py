"""nn.Modules that compose the ops and own parameters: attention, LightNet, positions, norms, MLPs, blocks.

Every layer takes `[B, T, D]` tokens (or `[B, C, H, W]` images for `PatchEmbed`); layers that decode token by
token take and return their cache explicitly. Every token mixer follows one interface (`polyattn.layers.mixer`:
`build(dim, num_heads, *, causal, grid_shape, **options)`, `(x, *, key_padding_mask, cache, use_cache,
grid_shape) -> (o, cache)`). Build your own model from these (see `examples/`).
"""

from .attention import Attention, KVCache, parse_mask_mode
from .block import TransformerBlock
from .cross_attention import CrossAttentionBlock, LinearCrossAttention
from .drop import DropPath, drop_path
from .early_exit import (
    EarlyExitOutput,
    check_exit_threshold,
    exit_confidence,
    run_blocks_all_exits,
    run_blocks_early_exit,
)
from .init import init_linear
from .kv_int8 import Int8KVCache, int8_kv_cache
from .lightnet import (
    GatePosition,
    LightNetAttention,
    LightNetBlock,
    LightNetCache,
    Lrpe,
    MdTpe,
    MixerInit,
    MultiScanAttention,
    NormalizerInit,
)
from .linear_attention import LinearAttention, LinearAttnCache, random_feature_layers, redraw_random_features
from .mixer import MixerKind, TokenMixer, build_mixer, mixer_class, mixer_options
from .mixer_hooks import MixerCall, call_op, observe_mixer_ops
from .mlp import GatedMlp, Mlp, llama_hidden_size
from .mod import MixtureOfDepths, Routing, check_capacity
from .norm import GroupRMSNorm, RMSNorm
from .patch_embed import PatchEmbed, PatchStem, to_2tuple
from .pos_embed import LearnedPosEmbed, resample_abs_pos_embed, sincos_pos_embed
from .reversible import ReversibleFunction, reversible_blocks, run_blocks, run_blocks_cached
from .rope import (
    Rotary,
    RotaryEmbedding,
    RotaryEmbeddingND,
    apply_rotary,
    axial_frequencies,
)
from .tied_kv_attention import TiedKVAttention
from .token_io import TokenIO

__all__ = [
    "Attention",
    "CrossAttentionBlock",
    "DropPath",
    "EarlyExitOutput",
    "GatePosition",
    "GatedMlp",
    "GroupRMSNorm",
    "Int8KVCache",
    "KVCache",
    "LearnedPosEmbed",
    "LightNetAttention",
    "LightNetBlock",
    "LightNetCache",
    "LinearAttention",
    "LinearAttnCache",
    "LinearCrossAttention",
    "Lrpe",
    "MdTpe",
    "MixerCall",
    "MixerInit",
    "MixerKind",
    "MixtureOfDepths",
    "Mlp",
    "MultiScanAttention",
    "NormalizerInit",
    "PatchEmbed",
    "PatchStem",
    "RMSNorm",
    "ReversibleFunction",
    "Rotary",
    "RotaryEmbedding",
    "RotaryEmbeddingND",
    "Routing",
    "TiedKVAttention",
    "TokenIO",
    "TokenMixer",
    "TransformerBlock",
    "apply_rotary",
    "axial_frequencies",
    "build_mixer",
    "call_op",
    "check_capacity",
    "check_exit_threshold",
    "drop_path",
    "exit_confidence",
    "init_linear",
    "int8_kv_cache",
    "llama_hidden_size",
    "mixer_class",
    "mixer_options",
    "observe_mixer_ops",
    "parse_mask_mode",
    "random_feature_layers",
    "redraw_random_features",
    "resample_abs_pos_embed",
    "reversible_blocks",
    "run_blocks",
    "run_blocks_all_exits",
    "run_blocks_cached",
    "run_blocks_early_exit",
    "sincos_pos_embed",
    "to_2tuple",
]
