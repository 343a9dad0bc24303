"""Pure tensor functions: the math of each token mixer, `[B, T, H, D]` layout, each with a reference form.

Submodules: `attention` (softmax attention and its masks), `lightnet`, `linear_attn` (kernelized),
`decay_scan`, `lrpe`, `tpe`. The submodule names are not shadowed here, so `polyattn.ops.attention` stays the
module: the softmax attention function is `from polyattn.ops.attention import attention` (or
`polyattn.ops.softmax_attention`, the same function under a name that does not collide).
"""

from .attention import (
    Backend,
    MaskMode,
    attention_ref,
    causal_mask,
    padding_to_attn_mask,
    shifted_group_mask,
)
from .attention import attention as softmax_attention
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
    feature_map_fn,
    linear_attn,
    linear_attn_recurrent,
    linear_attn_reference,
)
from .lrpe import lrpe_cosine, lrpe_rotary, lrpe_theta, md_lrpe_angles
from .tpe import md_tpe_scan, tpe_reference, tpe_scan

__all__ = [
    "Backend",
    "FeatureMap",
    "LightNetState",
    "LinearAttnState",
    "MaskMode",
    "attention_ref",
    "causal_mask",
    "decay_attn",
    "decay_attn_recurrent",
    "decay_attn_reference",
    "feature_map_fn",
    "lightnet_attn",
    "lightnet_chunk",
    "lightnet_global",
    "lightnet_recurrent",
    "lightnet_reference",
    "linear_attn",
    "linear_attn_recurrent",
    "linear_attn_reference",
    "lrpe_cosine",
    "lrpe_rotary",
    "lrpe_theta",
    "md_lrpe_angles",
    "md_tpe_scan",
    "multi_scan_decay_attn",
    "padding_to_attn_mask",
    "scan_orders",
    "shifted_group_mask",
    "softmax_attention",
    "tpe_reference",
    "tpe_scan",
]
