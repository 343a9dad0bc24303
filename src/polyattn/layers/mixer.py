"""One token-mixer interface: how a model builds a mixer and calls it, whichever mixer it is.

Every token mixer (softmax `Attention`, `LightNetAttention`, `MultiScanAttention`, kernelized `LinearAttention`)
follows the same two contracts, so a model takes a mixer class (or a `MixerKind`, which a recipe names by its
string) and nothing else in the model changes:

- Construction: `cls.build(dim, num_heads, *, causal, grid_shape=None, **options)`. The model says what it
  needs (a causal mixer or not, the grid of its tokens); `options` are the mixer's own constructor arguments,
  checked by `build_mixer` against the class: a name the class does not take is an error that lists the valid
  ones, and so are the arguments `build` sets itself (`BUILD_ARGS`, e.g. softmax attention's `mask_mode`).
- Call: softmax `Attention`'s form, `mixer(x [B, T, dim], *, key_padding_mask=None, cache=None, use_cache=False,
  grid_shape=None) -> (o [B, T, dim], cache | None)`. `key_padding_mask` is `[B, T]` bool, True = real token;
  `cache` is the mixer's own decoding state from a previous call (whatever type the mixer defines) and the new
  one comes back when `cache` was passed or `use_cache` is set; `grid_shape` is the grid the tokens lie on,
  which a mixer without grid positions does not need.
- Attribute: `causal` (bool): no output depends on a later token, and a cached continuation equals the full
  forward. A mixer with no decoding state at all (the multi-direction scan) refuses a cache.

`tests/test_token_mixers.py` runs these contracts over every `MixerKind`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import UserError, nearest, parse_enum
from .attention import Attention
from .lightnet import LightNetAttention, MultiScanAttention
from .linear_attention import LinearAttention


@runtime_checkable
class TokenMixer(Protocol):
    """The call form every token mixer has (module docstring)."""

    causal: bool

    def __call__(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, cache: Any = None,
                 use_cache: bool = False, grid_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, Any]:
        ...


class MixerKind(str, Enum):
    """The token mixers a recipe can name (`model.mixer: lightnet`)."""

    SOFTMAX = "softmax"  # multi-head softmax attention, `polyattn.layers.attention.Attention`
    LIGHTNET = "lightnet"  # LightNet attention, `polyattn.layers.lightnet.LightNetAttention`
    MULTISCAN = "multiscan"  # multiplicative decay over several scan orders, `MultiScanAttention`
    # kernelized linear attention, `polyattn.layers.linear_attention.LinearAttention`, one kind per feature map
    LINEAR_ELU = "linear_elu"  # elu + 1 (arXiv 2006.16236)
    LINEAR_RELU = "linear_relu"  # relu
    PERFORMER = "performer"  # FAVOR+ positive random features (arXiv 2009.14794)
    COSFORMER = "cosformer"  # relu with cos re-weighting (arXiv 2202.08791)
    HEDGEHOG = "hedgehog"  # learnable softmax-like map (arXiv 2402.04347)

    @property
    def layer(self) -> type[nn.Module]:
        """The mixer class."""
        return _LAYERS[self][0]

    @property
    def preset(self) -> dict[str, Any]:
        """The options this kind fixes (the feature map of a linear-attention kind)."""
        return dict(_LAYERS[self][1])


_LAYERS: dict[MixerKind, tuple[type[nn.Module], dict[str, Any]]] = {
    MixerKind.SOFTMAX: (Attention, {}),
    MixerKind.LIGHTNET: (LightNetAttention, {}),
    MixerKind.MULTISCAN: (MultiScanAttention, {}),
    MixerKind.LINEAR_ELU: (LinearAttention, {"feature_map": "elu"}),
    MixerKind.LINEAR_RELU: (LinearAttention, {"feature_map": "relu"}),
    MixerKind.PERFORMER: (LinearAttention, {"feature_map": "favor"}),
    MixerKind.COSFORMER: (LinearAttention, {"feature_map": "cosformer"}),
    MixerKind.HEDGEHOG: (LinearAttention, {"feature_map": "hedgehog"}),
}


def mixer_class(mixer: MixerKind | str | type[nn.Module]) -> type[nn.Module]:
    """The mixer class of a `MixerKind`, its string, or a class that has `build` (returned as it is)."""
    if isinstance(mixer, type):
        if not callable(getattr(mixer, "build", None)):
            raise UserError(f"{mixer.__name__} is not a token mixer: it has no `build(dim, num_heads, *, causal, "
                            "grid_shape, **options)` (see polyattn.layers.mixer).")
        return mixer
    return parse_enum(MixerKind, mixer, "mixer").layer


def mixer_options(cls: type[nn.Module]) -> list[str]:
    """The constructor arguments of mixer class `cls` that a model may pass as options (all keyword arguments
    but those `build` sets itself)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # after self, dim, num_heads
    built = set(getattr(cls, "BUILD_ARGS", ()))
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in built]


def check_mixer_options(cls: type[nn.Module], options: dict[str, Any]) -> None:
    """A `UserError` naming the first option that `cls` does not take, with the valid ones."""
    valid = mixer_options(cls)
    for key in options:
        if key not in valid:
            raise UserError(f"The {cls.__name__} token mixer has no option '{key}'.{nearest(key, valid)} "
                            f"Its options are: {', '.join(valid)}.")


def build_mixer(mixer: MixerKind | str | type[nn.Module], dim: int, num_heads: int, *, causal: bool,
                grid_shape: Sequence[int] | None = None, **options) -> nn.Module:
    """Builds a token mixer for a model: `mixer_class(mixer).build(dim, num_heads, causal=..., grid_shape=...,
    **options)` after checking that every option applies to that mixer."""
    cls = mixer_class(mixer)
    check_mixer_options(cls, options)
    kind = None if isinstance(mixer, type) else parse_enum(MixerKind, mixer, "mixer")
    preset = {} if kind is None else kind.preset
    for key in preset:
        if key in options:
            raise UserError(f"The {kind.value} mixer sets {key} itself ({preset[key]!r}); drop the option or name "
                            f"another mixer kind.")
    return cls.build(dim, num_heads, causal=causal, grid_shape=grid_shape, **preset, **options)


def mixer_name(mixer: MixerKind | str | type[nn.Module]) -> str:
    """How an error names a mixer: its kind's string or its class name."""
    return mixer.__name__ if isinstance(mixer, type) else parse_enum(MixerKind, mixer, "mixer").value


def refuse_changed(owner: str, mixer: MixerKind | str | type[nn.Module], belongs_to: str,
                   **args: tuple[Any, Any]) -> None:
    """A model's arguments for one mixer (`name=(value, default)`), refused when changed from their defaults while
    the model's mixer is another one: they would change nothing. (The default itself cannot be told apart from an
    unset argument, since a run directory stores every argument.)"""
    changed = [name for name, (value, default) in args.items() if value != default]
    if changed:
        verb, pronoun = ("belong", "them") if len(changed) > 1 else ("belongs", "it")
        raise UserError(f"{' and '.join(changed)} {verb} to the {belongs_to} mixer, and this {owner}'s mixer is "
                        f"{mixer_name(mixer)}; leave {pronoun} at the default.")
