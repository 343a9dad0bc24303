"""The Hugging Face interface (the `hf` extra): polyattn's language models as transformers models.

Importing this package registers model type "polyattn" with `AutoConfig`, `AutoModelForCausalLM` and
`AutoModelForMaskedLM`, so a folder written by `polyattn hf RUN_DIR OUT` (`convert_run`) or by `save_pretrained`
loads with the Auto classes, and `AutoTokenizer` reads its tokenizer:

    import polyattn.hf  # registers the classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(OUT)
    tokenizer = AutoTokenizer.from_pretrained(OUT)
    model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=50)

One model type for every family: the config names the registered polyattn model, and polyattn's registry builds
it, so the families need no table of their own here (`modeling`). `generate` decodes with each model's own cache:
the softmax KV cache, LightNet's recurrent state, the Perceivers' windows (`PolyattnCache`).
"""

from ..errors import UserError

try:
    import transformers
except ImportError as err:
    raise UserError("The Hugging Face interface needs the 'transformers' package; install it with "
                    "pip install 'polyattn[hf]'.") from err

from .convert import convert_run
from .modeling import (
    MODEL_TYPE,
    PolyattnCache,
    PolyattnConfig,
    PolyattnForCausalLM,
    PolyattnForMaskedLM,
    PolyattnPreTrainedModel,
    from_polyattn,
)
from .tokenizer import hf_tokenizer

transformers.AutoConfig.register(MODEL_TYPE, PolyattnConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(PolyattnConfig, PolyattnForCausalLM, exist_ok=True)
transformers.AutoModelForMaskedLM.register(PolyattnConfig, PolyattnForMaskedLM, exist_ok=True)

__all__ = ["PolyattnCache", "PolyattnConfig", "PolyattnForCausalLM", "PolyattnForMaskedLM", "PolyattnPreTrainedModel",
           "convert_run", "from_polyattn", "hf_tokenizer"]
