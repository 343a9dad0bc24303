"""The single-token decoding step of a causal LM as a module of plain tensors, for export.

`model.forward_cached` (see `polyattn.models.generation`) carries each family's own cache object. An exported
graph needs the state as explicit tensor inputs and outputs of fixed shape, so each family gets a `DecodeStep`
that packs its cache into a flat tuple of tensors and back:

- `RecurrentStep` (LightNet): the cache is already a fixed-size tree of tensors (the TPE state, and per layer
  `S`, the log-normaliser `z` and the LRPE counter); it is flattened as it is. The state does not grow.
- `BoundedKVStep` (softmax, LLaMA-style): one key and one value tensor per layer, `[B, max_len, Hkv, D]`, and one
  `[B, max_len]` mask of the slots holding real tokens. Each step appends the new key and value and drops the
  oldest slot, so the empty slots form a left padding, which the model already decodes exactly (RoPE positions
  count real tokens). A sequence may not outgrow `max_len`; the step attends over all `max_len` slots.
- `WindowStep` (LLP): the last `window` tokens and their mask; each step shifts the new token in and runs
  `forward` over the window (the model's own uncached reference, read through its last n tokens).
- `LatentWindowStep` (Perceiver AR and its Double / Split / Compressed variants): the model's own `WindowCache`
  as four tensors, the window's tokens, mask and absolute positions and the count of real tokens seen, continued
  by the family's window recomputation (`LatentPerceiver.forward_cached`). The positions must be absolute, not
  counted from the window's start: Compressed attention's compressed rows carry no rotation, so its logits
  depend on where the window sits in the sequence, and a window-relative step departs from `generate` once the
  sequence outgrows the window.

`STEPS` maps the model classes to their step: the one place that knows which cache each family has. The empty
state is not built from knowledge of the cache's internals: it is the model's own cache after a call on one
padding token (a left-padded prompt with no real token yet), widened to the bounded size where needed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import UserError
from ..layers.attention import KVCache


class DecodeStep(nn.Module):
    """`forward(token [B, 1], *state) -> (logits [B, V], *new_state)`; `initial_state(batch)` is the empty state."""

    state_names: tuple[str, ...]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _empty_cache(self, batch: int, device):
        """The model's cache after one padding token: the state of a sequence with no real token yet."""
        token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pad = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        with torch.no_grad():
            return self.model.forward_cached(token, None, attention_mask=pad)[1]


class RecurrentStep(DecodeStep):
    """A cache that is a fixed-size tree of tensors (LightNet's recurrent state), flattened as it is."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        leaves, self._spec = pytree.tree_flatten(self._empty_cache(1, "cpu"))
        self.state_names = tuple(f"state_{i}" for i in range(len(leaves)))

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        return tuple(pytree.tree_flatten(self._empty_cache(batch, next(self.model.parameters()).device))[0])

    def forward(self, token: torch.Tensor, *state: torch.Tensor):
        cache = pytree.tree_unflatten(list(state), self._spec)
        logits, cache = self.model.forward_cached(token, cache)
        return (logits[:, -1], *pytree.tree_flatten(cache)[0])


class BoundedKVStep(DecodeStep):
    """A softmax KV cache of `max_len` slots (module docstring): keys, values per layer, and one slot mask."""

    def __init__(self, model: nn.Module, max_len: int):
        super().__init__(model)
        if max_len < 1:
            raise UserError(f"The bounded KV cache needs at least one slot, got max_len={max_len}.")
        if getattr(model, "mod_capacity", None) is not None:  # one slot mask for all layers cannot hold theirs
            raise UserError("A Mixture-of-Depths model's routed blocks cache only the tokens they computed, so its "
                            "layers' caches differ in length and the bounded KV step cannot hold them; export a "
                            "model trained without model.mod_capacity, or decode it with `polyattn generate`.")
        self.max_len = max_len
        self.depth = len(self._empty_cache(1, "cpu"))
        self.state_names = (*(f"{kv}_{i}" for i in range(self.depth) for kv in ("k", "v")), "slot_mask")

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        caches = self._empty_cache(batch, next(self.model.parameters()).device)
        widen = lambda t: t.new_zeros(t.shape[0], self.max_len, *t.shape[2:])
        out = [widen(t) for c in caches for t in (c.k, c.v)]
        return (*out, torch.zeros(batch, self.max_len, dtype=torch.bool, device=out[0].device))

    def forward(self, token: torch.Tensor, *state: torch.Tensor):
        mask = state[-1]
        cache = tuple(KVCache(state[2 * i], state[2 * i + 1], mask, self.max_len) for i in range(self.depth))
        logits, cache = self.model.forward_cached(token, cache)
        kv = [t[:, 1:] for c in cache for t in (c.k, c.v)]  # drop the oldest slot: the size stays max_len
        return (logits[:, -1], *kv, cache[0].key_padding_mask[:, 1:])


class WindowStep(DecodeStep):
    """The last `window` tokens and their mask; each step runs `forward` over the window."""

    state_names = ("window", "window_mask")

    def __init__(self, model: nn.Module, window: int):
        super().__init__(model)
        self.window = window

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        device = next(self.model.parameters()).device
        return (torch.zeros(batch, self.window, dtype=torch.long, device=device),
                torch.zeros(batch, self.window, dtype=torch.bool, device=device))

    def forward(self, token: torch.Tensor, window: torch.Tensor, window_mask: torch.Tensor):
        window = torch.cat((window[:, 1:], token), 1)
        window_mask = torch.cat((window_mask[:, 1:], torch.ones_like(window_mask[:, :1])), 1)
        logits = self.model(window, attention_mask=window_mask)
        return logits[:, -1], window, window_mask


class LatentWindowStep(DecodeStep):
    """A Perceiver AR family model's `WindowCache` of `window` slots (module docstring): tokens, mask, absolute
    positions `[B, window]` and the real tokens seen `[B]`."""

    state_names = ("window", "window_mask", "window_positions", "seen")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.window = model.max_seq_len

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        device = next(self.model.parameters()).device
        empty = lambda dtype: torch.zeros(batch, self.window, dtype=dtype, device=device)
        return (empty(torch.long), empty(torch.bool), empty(torch.long),
                torch.zeros(batch, dtype=torch.long, device=device))

    def forward(self, token: torch.Tensor, window: torch.Tensor, window_mask: torch.Tensor,
                window_positions: torch.Tensor, seen: torch.Tensor):
        from ..models.perceiver_family import LatentPerceiver, WindowCache

        # the family's recomputation of the window, not Perceiver AR's own latent-KV cache (it grows): the
        # window's padding slots (mask False) sit left of the real tokens, so the window keeps its size
        cache = WindowCache(window, window_mask, window_positions, seen)
        logits, cache = LatentPerceiver.forward_cached(self.model, token, cache)
        return logits[:, -1], cache.tokens, cache.mask, cache.positions, cache.seen


def _steps() -> dict[type, callable]:
    from ..models.lightnet_lm import LightNetLM
    from ..models.llama_lm import LlamaLM
    from ..models.perceiver_family import LatentPerceiver
    from ..models.perceiver_llp import LLPTransformer

    # LatentPerceiver: Perceiver AR and its Double / Split / Compressed variants, which decode over one window
    return {LightNetLM: lambda m, n: RecurrentStep(m), LlamaLM: BoundedKVStep,
            LatentPerceiver: lambda m, n: LatentWindowStep(m), LLPTransformer: lambda m, n: WindowStep(m, n)}


def decode_step(model: nn.Module, max_len: int) -> DecodeStep:
    """The `DecodeStep` of `model` (a registered causal LM); `max_len` bounds the KV cache or LLP's window."""
    for cls, build in _steps().items():
        if isinstance(model, cls):
            return build(model, max_len)
    names = ", ".join(c.__name__ for c in _steps())
    raise UserError(f"{type(model).__name__} has no exportable decoding step; --decode-step supports {names}.")


def greedy_decode(step, state, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a step function `step(token, *state) -> (logits, *state)` (the eager `DecodeStep`
    or an exported graph): the prompt is fed one token at a time, then `max_new_tokens` are chosen by argmax.
    Returns the prompt and the new tokens `[B, T + N]`."""
    state, logits = tuple(state), None
    for i in range(prompt.shape[1]):
        logits, *state = step(prompt[:, i:i + 1], *state)
    out = [prompt]
    for i in range(max_new_tokens):
        nxt = torch.as_tensor(logits).argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits, *state = step(nxt, *state)
    return torch.cat(out, 1)


__all__ = ["BoundedKVStep", "DecodeStep", "LatentWindowStep", "RecurrentStep", "WindowStep", "decode_step",
           "greedy_decode"]
