"""Rebuilding a transformed run: `load_run` calls `rebuild` with the `deploy` record of a run's config.

The record lists the transforms applied to the trained weights, in order; each is redone here on the freshly
built model *without* its weights (the module types and shapes only), so that the stored state dict loads into
it. Only module transforms live here: they depend on `layers`/`models`, never on the training engine.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError


def rebuild(model: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    """`model` with the modules of every transform in `records` put in place, ready for the stored weights."""
    from .prune import apply_plan
    from .quantize import empty_quantized

    for record in records:
        kind = record.get("transform")
        if kind == "quantize":
            empty_quantized(model, record["method"], list(record["modules"]))
        elif kind == "prune":  # the kept units (which ones matters for LightNet's per-head LRPE frequencies)
            apply_plan(model, record["plan"])
        else:
            raise UserError(f"Unknown transform {kind!r} in the run's deploy record; it was written by another "
                            f"polyattn version.")
    return model


__all__ = ["rebuild"]
