"""polyattn: efficient attention on multi-dimensional sequences.

Token mixers (softmax, LightNet, Perceiver family), the models built from them, and the tools to train,
sample and measure them. `import polyattn` stays light: heavy optional parts load on first use.
"""

from .errors import UserError
from .registry import (
    count_parameters,
    create_model,
    list_models,
    parameter_count,
    register_model,
    resolve_model_args,
)

__version__ = "0.1.0"


def load_run(run_dir, *, ema=None, device="cpu", overrides=None):
    """Loads a run directory: `model, config, tokenizer = load_run(RUN_DIR)`; see `polyattn.train.load_run`.

    Defined here as a thin wrapper so that `import polyattn` does not import the training engine.
    """
    from .train.loop import load_run as _load_run

    return _load_run(run_dir, ema=ema, device=device, overrides=overrides)


__all__ = [
    "UserError",
    "__version__",
    "count_parameters",
    "create_model",
    "list_models",
    "load_run",
    "parameter_count",
    "register_model",
    "resolve_model_args",
]
