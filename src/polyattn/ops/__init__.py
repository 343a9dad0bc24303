"""Pure tensor functions: the math of each token mixer, `[B, T, H, D]` layout, each with a reference form.

Submodules: `attention` (softmax attention and its masks), `lightnet`, `linear_attn` (kernelized, with its
feature maps), `decay_scan`, `chunk_gated` (the chunk kernel lightnet and decay_scan share), `lrpe`, `tpe`, `losses`
(the one cross-entropy and `IGNORE_INDEX`), `linear_cross_attention` (kernelized cross-attention over a fixed-size
context state), `sequence` (positions from padding masks, packed documents, grid coordinates). The submodule names
are not shadowed here, so `polyattn.ops.attention` stays the module: the softmax attention function is
`from polyattn.ops.attention import attention` (or `polyattn.ops.softmax_attention`, the same function under a name
that does not collide).
"""

from .attention import (
    Backend,
    MaskMode,
    attention_ref,
    causal_mask,
    causal_mask_at,
    double_mask,
    llp_mask,
    padding_to_attn_mask,
    segment_pair_attention,
    shifted_group_attention,
    shifted_group_mask,
    shifted_group_mask_at,
    split_mask,
)
from .attention import attention as softmax_attention
from .chunk_gated import chunk_gated_core
from .decay_scan import decay_attn, decay_attn_recurrent, decay_attn_reference, multi_scan_decay_attn, scan_orders
from .lightnet import (
    LightNetState,
    lightnet_attn,
    lightnet_chunk,
    lightnet_global,
    lightnet_recurrent,
    lightnet_reference,
)
from .linear_attn import (
    FeatureMap,
    LinearAttnState,
    elu_feature_map,
    feature_map_fn,
    linear_attn,
    linear_attn_recurrent,
    linear_attn_reference,
)
from .linear_cross_attention import (
    LinearContextState,
    linear_context_state,
    linear_cross_attn,
    linear_cross_attn_reference,
)
from .losses import IGNORE_INDEX, cross_entropy
from .lrpe import lrpe_cosine, lrpe_rotary, lrpe_theta, md_lrpe_angles
from .sequence import (
    cat_padding_masks,
    check_cu_seqlens,
    document_positions,
    grid_positions,
    pack_sequences,
    real_counts,
    real_positions,
    unpack_sequences,
)
from .tpe import md_tpe_scan, tpe_reference, tpe_scan

__all__ = [
    "IGNORE_INDEX",
    "Backend",
    "FeatureMap",
    "LightNetState",
    "LinearAttnState",
    "LinearContextState",
    "MaskMode",
    "attention_ref",
    "cat_padding_masks",
    "causal_mask",
    "causal_mask_at",
    "check_cu_seqlens",
    "chunk_gated_core",
    "cross_entropy",
    "decay_attn",
    "decay_attn_recurrent",
    "decay_attn_reference",
    "document_positions",
    "double_mask",
    "elu_feature_map",
    "feature_map_fn",
    "grid_positions",
    "lightnet_attn",
    "lightnet_chunk",
    "lightnet_global",
    "lightnet_recurrent",
    "lightnet_reference",
    "linear_attn",
    "linear_attn_recurrent",
    "linear_attn_reference",
    "linear_context_state",
    "linear_cross_attn",
    "linear_cross_attn_reference",
    "llp_mask",
    "lrpe_cosine",
    "lrpe_rotary",
    "lrpe_theta",
    "md_lrpe_angles",
    "md_tpe_scan",
    "multi_scan_decay_attn",
    "pack_sequences",
    "padding_to_attn_mask",
    "real_counts",
    "real_positions",
    "scan_orders",
    "segment_pair_attention",
    "shifted_group_attention",
    "shifted_group_mask",
    "shifted_group_mask_at",
    "softmax_attention",
    "split_mask",
    "tpe_reference",
    "tpe_scan",
    "unpack_sequences",
]
