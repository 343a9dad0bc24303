"""Whole architectures, one file per family; importing this package registers them all."""

from . import (  # noqa: F401
    bert,
    dit,
    illama,
    lightnet_lm,
    lightnet_vision,
    llama_lm,
    perceiver_ar,
    perceiver_llp,
    vit,
)
