"""Whole architectures, one file per family; importing this package registers them all.

Build a registered variant with `polyattn.create_model(name, **overrides)`, or a model class directly with
your own arguments. The submodule names (`vit`, `dit`, ...) stay the modules.
"""

from . import (
    bert,
    dit,
    illama,
    lightnet_lm,
    lightnet_vision,
    llama_lm,
    perceiver_ar,
    perceiver_family,
    perceiver_llp,
    perceiver_variants,
    perceiver_vision,
    vit,
)
from .bert import BertMLM
from .classifier import EarlyExitMixin
from .dit import DiT, DiTBlock
from .generation import CausalLMMixin, generate, stream_generate
from .illama import ILLaMA
from .lightnet_lm import LightNetLM, LightNetMLM
from .lightnet_vision import LightNetViT, MultiScanViT, TokenMixerViT
from .llama_lm import LlamaLM
from .perceiver_ar import PerceiverAR
from .perceiver_llp import LLPTransformer
from .perceiver_variants import CompressedAttentionPerceiver, DoubleAttentionPerceiver, SplitAttentionPerceiver
from .perceiver_vision import PerceiverVision
from .vit import VisionTransformer

__all__ = [
    "BertMLM",
    "CausalLMMixin",
    "CompressedAttentionPerceiver",
    "DiT",
    "DiTBlock",
    "DoubleAttentionPerceiver",
    "EarlyExitMixin",
    "ILLaMA",
    "LLPTransformer",
    "LightNetLM",
    "LightNetMLM",
    "LightNetViT",
    "LlamaLM",
    "MultiScanViT",
    "PerceiverAR",
    "PerceiverVision",
    "SplitAttentionPerceiver",
    "TokenMixerViT",
    "VisionTransformer",
    "bert",
    "dit",
    "generate",
    "illama",
    "lightnet_lm",
    "lightnet_vision",
    "llama_lm",
    "perceiver_ar",
    "perceiver_family",
    "perceiver_llp",
    "perceiver_variants",
    "perceiver_vision",
    "stream_generate",
    "vit",
]
