"""Whole architectures, one file per family; importing this package registers them all."""

from . import (  # noqa: F401
    illama,
    lightnet_lm,
    lightnet_vision,
    llama_lm,
    vit,
)
