"""Model registry: `register_model`, `create_model`, `list_models`.

An entry is a function decorated with `@register_model(ModelClass, task=...)` that returns the variant's
constructor arguments. Keeping entries declarative lets the registry validate overrides against the
constructor's signature (an unknown argument names the nearest valid one), resolve the full argument set
that a run directory stores, and count parameters without allocating memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError, nearest

TASKS = ("classification", "causal_lm", "masked_lm", "diffusion")
SIZES = ("femto", "pico", "nano", "micro", "tiny", "small", "base", "large", "xl")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    task: str
    default_args: Callable[[], dict[str, Any]]
    description: str

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The model constructor's named parameters (what an override may set)."""
        sig = inspect.signature(self.cls.__init__)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {k: p for k, p in sig.parameters.items() if k != "self" and p.kind in kinds}

    def inputs(self) -> list[str]:
        """The keyword inputs of the model's forward beyond its data (what an input schedule may feed, such as
        iLLaMA's `soft_mask_a`)."""
        sig = inspect.signature(self.cls.forward)
        # a boolean keyword is a switch of what forward returns (an early-exit model's `all_exits`), not a value
        return [k for k, p in sig.parameters.items() if not isinstance(p.default, bool) and (
                p.kind is inspect.Parameter.KEYWORD_ONLY
                or (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty))]


_MODELS: dict[str, ModelEntry] = {}


def register_model(cls: type, *, task: str):
    """Registers the decorated function, named `<family>_<size>`, as a variant of `cls` for `task`.

    The function takes no arguments and returns the keyword arguments that define the variant; its
    docstring's first line is the description shown by `polyattn models`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    def decorator(fn: Callable[[], dict[str, Any]]):
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if name.rsplit("_", 1)[-1] not in SIZES:
            raise ValueError(f"model name {name!r} must end in a size, one of {SIZES}")
        doc = (fn.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelEntry(name, cls, task, fn, doc[0] if doc else "")
        return fn

    return decorator


def _ensure_models_imported() -> None:
    from . import models  # noqa: F401  (importing the package registers every family)


def get_entry(name: str) -> ModelEntry:
    _ensure_models_imported()
    if name not in _MODELS:
        raise UserError(f"Unknown model '{name}'.{nearest(name, _MODELS)} Run `polyattn models` to list them.")
    return _MODELS[name]


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally only those for one task."""
    _ensure_models_imported()
    if task is not None and task not in TASKS:
        raise UserError(f"Unknown task '{task}'.{nearest(task, TASKS)} Tasks are: {', '.join(TASKS)}.")
    return sorted(n for n, e in _MODELS.items() if task is None or e.task == task)


def resolve_model_args(name: str, **overrides) -> dict[str, Any]:
    """The complete constructor arguments of `name` with `overrides` applied (what a run directory stores)."""
    entry = get_entry(name)
    params = entry.parameters()
    for key in overrides:
        if key not in params:
            raise UserError(f"Model '{name}' has no argument '{key}'.{nearest(key, params)}")
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    args.update(entry.default_args())
    args.update(overrides)
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in args]
    if missing:
        raise UserError(f"Model '{name}' needs a value for {', '.join(missing)}.")
    return args


def create_model(name: str, **overrides):
    """Builds the registered model `name`; keyword overrides replace the variant's arguments."""
    entry = get_entry(name)
    return entry.cls(**resolve_model_args(name, **overrides))


def model_task(name: str) -> str:
    return get_entry(name).task


def parameter_count(model) -> int:
    """The weights a model has, as its user counts them: its parameters, plus the weights that a quantized layer
    holds as integer buffers (not parameters), counted as the float layer's `in · out (+ out)` it stands for
    (modules that hold such weights say how many with `quantized_parameters()`), so a quantized run reports the
    size of the model it came from."""
    return (sum(p.numel() for p in model.parameters())
            + sum(m.quantized_parameters() for m in model.modules() if hasattr(m, "quantized_parameters")))


def count_parameters(name: str, **overrides) -> int:
    """Parameter count of a variant, built on the meta device so nothing is allocated."""
    import torch

    with torch.device("meta"):
        model = create_model(name, **overrides)
    return parameter_count(model)
