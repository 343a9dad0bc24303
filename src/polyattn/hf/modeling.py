"""polyattn's language models as transformers `PreTrainedModel`s.

One configuration class, `PolyattnConfig` (model type "polyattn"), holds the registered model name and its complete
constructor arguments; polyattn's registry, not a second table here, says which architecture a name builds. Two
model classes wrap any registered LM of their task: `PolyattnForCausalLM` (LLaMA-style, LightNet, Perceiver AR and
its Double / Split / Compressed variants, LLP) and `PolyattnForMaskedLM` (BERT-style, bidirectional LightNet). The
wrapped polyattn module is `model.model`, so the safetensors keys are polyattn's own, prefixed by `model.`.

Decoding state. Each family keeps its own cache object (a tuple of `KVCache`, `LightNetLMCache`, `PerceiverARCache`,
`WindowCache`, `LLPCache`), which `forward_cached` takes and returns. Inside transformers' generation loop that
object travels in a `PolyattnCache`, a `Cache` subclass with no per-layer entries: it carries the state and the
number of columns the state has consumed (`get_seq_length`, which `generate` uses to cut a continued prompt). The
model class says `_supports_default_dynamic_cache() == False`, so `generate` does not build a `DynamicCache` for it;
the first forward creates the `PolyattnCache` and every later forward updates it in place. The state cannot be
cropped or reordered by beam index, so generation offers greedy decoding and sampling (`_supported_generation_modes`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput

from ..errors import UserError
from ..ops.losses import IGNORE_INDEX
from ..registry import get_entry

MODEL_TYPE = "polyattn"


def plain_args(args: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as JSON values (an enum member by its value), for `config.json`."""
    out = {}
    for key, value in args.items():
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, type):
            raise UserError(f"model argument {key}={value.__name__} is a class, which config.json cannot hold; "
                            f"build the model with its registered name instead.")
        out[key] = value
    return out


class PolyattnConfig(PretrainedConfig):
    """A registered polyattn model: its name and its complete constructor arguments.

    Args:
        model_name (str): a name of `polyattn.list_models()` (e.g. "lightnet_lm_nano").
        model_args (dict): the constructor arguments (`polyattn.resolve_model_args(name, **overrides)`, which a run
            directory stores); missing ones take the constructor's defaults.
        **kwargs: `PretrainedConfig`'s own fields (token ids, `use_cache`, ...).
    """

    model_type = MODEL_TYPE

    def __init__(self, model_name: str | None = None, model_args: dict[str, Any] | None = None, **kwargs):
        self.model_name = model_name
        self.model_args = plain_args(model_args or {})
        self.vocab_size = self.model_args.get("vocab_size")
        self.use_cache = kwargs.pop("use_cache", True)
        # polyattn ties the head to the embedding inside its own TokenIO (`model_args["tie_embeddings"]`), by
        # reading one matrix twice; transformers must not tie parameters on top of that
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


class PolyattnCache(Cache):
    """A polyattn model's own decoding state (`state`, what its `forward_cached` returns) in transformers' loop.

    Attributes:
        state: the family's cache object, or None before the first forward.
        seen (int): columns (padding included) the state has consumed: the `get_seq_length` that `generate` cuts
            a continued prompt by.
    """

    def __init__(self, state: Any = None, seen: int = 0):
        super().__init__(layers=[])
        self.state, self.seen = state, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    # With no per-layer entries the base class would answer these from an empty list (all([]) is True): say what
    # holds for a state that is replaced, not appended to, at every step.
    @property
    def is_linear(self) -> list[bool]:
        return [False]  # `generate` then feeds a continued prompt from column `seen` on

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a polyattn decoding state cannot be cropped; start again from the shorter prompt")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a polyattn decoding state cannot be reordered by beam; use greedy decoding or "
                                  "sampling")

    def __repr__(self) -> str:
        return f"PolyattnCache({type(self.state).__name__}, seen={self.seen})"


class PolyattnPreTrainedModel(PreTrainedModel):
    """What both wrappers share: the polyattn model built from the config, as `self.model`."""

    config_class = PolyattnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    task: str
    """The polyattn task (`polyattn.registry.TASKS`) whose models the class wraps."""

    def __init__(self, config: PolyattnConfig):
        super().__init__(config)
        if not config.model_name:
            raise UserError("This PolyattnConfig names no model; build it with model_name= a registered polyattn "
                            "model (polyattn models lists them).")
        entry = get_entry(config.model_name)
        if entry.task != self.task:
            other = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM"}.get(entry.task)
            hint = f"load it with {other}" if other else "it has no Hugging Face wrapper"
            raise UserError(f"'{config.model_name}' is a {entry.task} model, not a {self.task} model; {hint}.")
        self.model = entry.cls(**config.model_args)
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: the polyattn constructor has initialised every weight its own way (LightNet's decays, scaled
        residual projections), and `from_pretrained` loads every weight from the checkpoint (the LMs hold no
        non-persistent buffers that it would have to recreate)."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.io.embed

    def get_output_embeddings(self) -> None:
        return None  # the head is polyattn's (TokenIO), tied or not by the model's own argument

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if attention_mask is None else attention_mask.bool()

    @staticmethod
    def _refuse(kwargs: dict[str, Any]) -> None:
        """transformers' optional outputs that polyattn's models do not produce; anything else is a typo."""
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False)}
        if unsupported:
            raise ValueError(f"polyattn models take input_ids, attention_mask, labels and (causal) cache/use_cache; "
                             f"they do not provide {sorted(unsupported)}")


class PolyattnForCausalLM(PolyattnPreTrainedModel, GenerationMixin):
    """A polyattn causal LM (`LlamaLM`, `LightNetLM`, the Perceiver AR family, `LLPTransformer`) for transformers.

    `forward` without a cache runs the model's own forward; with `use_cache` (or a `cache`) it runs
    `forward_cached`, the model's decoding path, and returns the state in a `PolyattnCache`. Logits are
    `[B, T, V]`; the latent Perceivers score only their last `min(T, num_latents)` positions, so theirs are
    `[B, min(T, N), V]` (the last position is always there, which is all `generate` reads).
    """

    task = "causal_lm"
    _is_stateful = True  # the state cannot be rolled back: no assisted decoding
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the first forward creates a PolyattnCache (module docstring)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: PolyattnCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                past_key_values: PolyattnCache | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        """Next-token logits of `input_ids [B, T]`, the loss with `labels`, and the decoding state with `use_cache`.

        Args:
            input_ids (Tensor): `[B, T]` token ids; with a `cache`, only the tokens it has not seen.
            attention_mask (Tensor, Optional): `[B, S]` 1 = real token, 0 = padding (left padding for prompts of
                different lengths); with a cache, `S` counts the cached columns too, as in transformers.
            cache (PolyattnCache, Optional): the state of an earlier call, continued (and updated in place).
            labels (Tensor, Optional): `[B, T]` the tokens themselves (shifted here: position t is scored on
                `labels[t + 1]`), `-100` = not scored. A loss call is a whole-sequence call: no cache.
            use_cache (bool, Optional): return the decoding state; default `config.use_cache` (not with labels).
            past_key_values: the older name of `cache`.
        """
        self._refuse(kwargs)
        cache = cache if cache is not None else past_key_values
        mask = self._mask(attention_mask)
        if labels is not None:
            if cache is not None:
                raise ValueError("labels score a whole sequence; call the model without a cache to get the loss")
            # HF labels are the inputs; polyattn's targets are the next tokens: shift, nothing after the last one
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
            logits, loss = self.model(input_ids, targets, attention_mask=mask)
            out = CausalLMOutputWithPast(loss=loss, logits=logits)
        elif cache is None and not (self.config.use_cache if use_cache is None else use_cache):
            out = CausalLMOutputWithPast(logits=self.model(input_ids, attention_mask=mask))
        else:
            cache = PolyattnCache() if cache is None else cache
            T = input_ids.shape[1]
            new_mask = None if mask is None else mask[:, -T:]
            if cache.state is not None and new_mask is not None and bool(new_mask.all()):
                new_mask = None  # a continued sequence of real tokens: the call polyattn's own decoding makes
            logits, cache.state = self.model.forward_cached(input_ids, cache.state, attention_mask=new_mask)
            cache.seen += T
            out = CausalLMOutputWithPast(logits=logits, cache=cache)
        return out if return_dict is not False else out.to_tuple()


class PolyattnForMaskedLM(PolyattnPreTrainedModel):
    """A polyattn masked LM (`BertMLM`, `LightNetMLM`) for transformers; `[MASK]` is the last vocabulary id."""

    task = "masked_lm"

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, return_dict: bool | None = None,
                **kwargs) -> MaskedLMOutput | tuple:
        """Logits `[B, T, V]` of `input_ids` (with `[MASK]` ids in it), and the loss with `labels`.

        Args:
            input_ids (Tensor): `[B, T]` token ids.
            attention_mask (Tensor, Optional): `[B, T]` 1 = real token, 0 = padding.
            labels (Tensor, Optional): `[B, T]` the original tokens at the masked positions, `-100` elsewhere.
        """
        self._refuse(kwargs)
        mask = self._mask(attention_mask)
        if labels is None:
            out = MaskedLMOutput(logits=self.model(input_ids, attention_mask=mask))
        else:
            logits, loss = self.model(input_ids, labels, attention_mask=mask)
            out = MaskedLMOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


WRAPPERS: dict[str, type[PolyattnPreTrainedModel]] = {"causal_lm": PolyattnForCausalLM,
                                                      "masked_lm": PolyattnForMaskedLM}
"""The wrapper of each polyattn task that has one."""


def from_polyattn(model: torch.nn.Module, model_name: str, model_args: dict[str, Any] | None = None,
                  **config_kwargs) -> PolyattnPreTrainedModel:
    """The transformers wrapper of a built polyattn LM, with a copy of its weights.

    `model_args` are the arguments that built `model` (`polyattn.resolve_model_args(name, **overrides)`, or a run
    config's `resolved_model_args()`); None = the registered variant's own.
    """
    from ..registry import resolve_model_args

    task = get_entry(model_name).task
    if task not in WRAPPERS:
        raise UserError(f"'{model_name}' is a {task} model; the Hugging Face interface wraps causal and masked "
                        f"language models only.")
    args = resolve_model_args(model_name) if model_args is None else model_args
    config = PolyattnConfig(model_name=model_name, model_args=args, **config_kwargs)
    wrapper = WRAPPERS[task](config)
    wrapper.model.load_state_dict(model.state_dict())
    return wrapper.to(next(model.parameters()))  # the model's device and dtype


__all__ = ["MODEL_TYPE", "WRAPPERS", "PolyattnCache", "PolyattnConfig", "PolyattnForCausalLM", "PolyattnForMaskedLM",
           "PolyattnPreTrainedModel", "from_polyattn"]
