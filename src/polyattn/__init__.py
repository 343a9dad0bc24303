"""polyattn: efficient attention on multi-dimensional sequences.

Token mixers (softmax, LightNet, Perceiver family), the models built from them, and the tools to train,
sample and measure them. `import polyattn` stays light: heavy optional parts load on first use.
"""

from .errors import UserError
from .registry import count_parameters, create_model, list_models, register_model, resolve_model_args

__version__ = "0.1.0"

__all__ = [
    "UserError",
    "__version__",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
    "resolve_model_args",
]
