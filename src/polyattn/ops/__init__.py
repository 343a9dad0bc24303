"""Pure tensor functions: the math of each token mixer, `[B, T, H, D]` layout, each with a reference form.

Submodules: `attention` (softmax attention and its masks), `lightnet`, `decay_scan`, `lrpe`, `tpe`. The
submodule names are not shadowed here, so `polyattn.ops.attention` stays the module.
"""

from .attention import MaskMode
from .lightnet import lightnet_attn

__all__ = ["MaskMode", "lightnet_attn"]
