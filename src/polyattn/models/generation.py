"""What every causal language model shares: the next-token loss and `generate`, written once.

A causal LM in this library (`LlamaLM`, `LightNetLM`, ...) provides two forward entry points:

- `forward(tokens [B, T], targets=None, *, attention_mask=None, cu_seqlens=None)`: logits `[B, T, V]`, or
  `(logits, loss)` when `targets` is given (the mean `polyattn.ops.losses.cross_entropy` over the scored targets);
- `forward_cached(tokens [B, T], cache=None, *, attention_mask=None) -> (logits [B, T, V], cache)`: the same
  computation continued from `cache`, the model's explicit decoding state (one entry per layer, each with its
  own position counter). `cache=None` starts a new sequence; passing the returned cache back continues it,
  so one call over `[0, T)` equals a call over `[0, s)` followed by one over `[s, T)`.

`CausalLMMixin` adds `generate` to such a model; `stream_generate` yields tokens one step at a time (what
`polyattn generate` prints as they come).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from ..ops.losses import cross_entropy


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token `[B]` from last-position logits `[B, V]`.

    Temperature 0 is greedy (argmax; top-k/top-p then change nothing). Otherwise the logits are divided by the
    temperature, restricted to the `top_k` most likely tokens and to the smallest set whose probability reaches
    `top_p` (nucleus sampling, arXiv 1904.09751; the most likely token is always kept), and sampled.
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class GenerationStep(NamedTuple):
    """One generation step: the chosen tokens `[B]` and the logits `[B, V]` they were drawn from."""

    tokens: torch.Tensor
    logits: torch.Tensor


def _check_args(tokens, max_new_tokens, temperature, top_k, top_p, attention_mask) -> None:
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [B, T] batch of prompts, got shape {tuple(tokens.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match tokens {tuple(tokens.shape)}")
        if not attention_mask[:, -1].all():
            raise ValueError("prompts of different lengths must be left-padded (the last position real in every "
                             "row), so that every row continues from its last token")


@torch.no_grad()
def stream_generate(model: nn.Module, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, use_cache: bool = True, *,
                    attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None,
                    cache_transform: Callable | None = None) -> Iterator[GenerationStep]:
    """Yields `max_new_tokens` `GenerationStep`s continuing the prompts `tokens [B, T]`.

    With `use_cache`, the prompt is run once through `model.forward_cached` and each new token is one more
    cached call (KV cache for softmax attention, recurrent state for LightNet); without it, every step runs
    `model(...)` over the whole sequence again (the reference the cache is tested against). The model is put
    in eval mode for the duration and restored afterwards.

    Args:
        attention_mask (Tensor, Optional): `[B, T]` bool, True = real token, for left-padded prompts.
        generator (torch.Generator, Optional): random source for sampling (temperature > 0).
        cache_transform (Callable, Optional): applied to the cache after the prompt (e.g.
            `polyattn.layers.int8_kv_cache`, which stores a softmax KV cache in int8); with `use_cache` only.
    """
    _check_args(tokens, max_new_tokens, temperature, top_k, top_p, attention_mask)
    was_training = model.training
    model.eval()
    try:
        pick = lambda logits: sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator)
        if max_new_tokens == 0:
            return
        if use_cache:
            logits, cache = model.forward_cached(tokens, None, attention_mask=attention_mask)
            if cache_transform is not None:
                cache = cache_transform(cache)
            for i in range(max_new_tokens):
                last = logits[:, -1].float()
                nxt = pick(last)
                yield GenerationStep(nxt, last)
                if i + 1 < max_new_tokens:
                    logits, cache = model.forward_cached(nxt[:, None], cache)
        else:
            seq, mask = tokens, attention_mask
            for _ in range(max_new_tokens):
                last = model(seq, attention_mask=mask)[:, -1].float()
                nxt = pick(last)
                yield GenerationStep(nxt, last)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    finally:
        model.train(was_training)


def generate(model: nn.Module, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True, *,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The prompts followed by `max_new_tokens` generated tokens: `[B, T + N]` (see `stream_generate`).

    With `return_logits`, also the logits `[B, N, V]` (float32) each new token was chosen from.
    """
    steps = list(stream_generate(model, tokens, max_new_tokens, temperature, top_k, top_p, use_cache,
                                 attention_mask=attention_mask, generator=generator))
    new = torch.stack([s.tokens for s in steps], 1) if steps else tokens.new_zeros(tokens.shape[0], 0)
    out = torch.cat([tokens, new.to(tokens.dtype)], dim=1)
    if not return_logits:
        return out
    logits = torch.stack([s.logits for s in steps], 1) if steps else tokens.new_zeros(tokens.shape[0], 0, 0).float()
    return out, logits


class CausalLMMixin:
    """Adds `generate` to a causal LM that implements `forward` and `forward_cached` (module docstring).

    A model that computes its logits with `_logits(tokens, attention_mask, cu_seqlens) -> [B, T, V]` gets the
    standard `forward` from here; models that score only some positions (Perceiver AR) define their own.
    """

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, T, V]` of `tokens [B, T]`, or `(logits, loss)` with next-token `targets [B, T]`.

        Args:
            tokens (Tensor): `[B, T]` int64.
            targets (Tensor, Optional): `[B, T]` int64, `IGNORE_INDEX` = not scored (see `polyattn.ops.losses`).
            attention_mask (Tensor, Optional): `[B, T]` bool/0-1, True = real token (padding mask).
            cu_seqlens (Tensor, Optional): `[N + 1]` offsets of documents packed into one row (`B == 1`).
        """
        logits = self._logits(tokens, attention_mask, cu_seqlens)
        return logits if targets is None else (logits, cross_entropy(logits, targets))

    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True, *,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Continues the prompts `tokens [B, T]` by `max_new_tokens` tokens; temperature 0 is greedy.

        Args:
            tokens (Tensor): `[B, T]` int64 prompts (left-padded, with `attention_mask`, when their lengths differ).
            max_new_tokens (int): tokens to add.
            temperature (float): 0 = greedy; otherwise the sampling temperature. Default: 0.0.
            top_k (int, Optional): sample among the k most likely tokens only.
            top_p (float, Optional): nucleus sampling threshold.
            use_cache (bool): decode with the model's cache (one token per step) instead of recomputing the
                whole sequence each step. Default: True.
            attention_mask (Tensor, Optional): `[B, T]` bool, True = real token.
            generator (torch.Generator, Optional): random source for sampling.
            return_logits (bool): also return the logits `[B, N, V]` of each step.

        Returns:
            Tensor: `[B, T + N]`, or `(tokens, logits)` with `return_logits`.
        """
        return generate(self, tokens, max_new_tokens, temperature, top_k, top_p, use_cache,
                        attention_mask=attention_mask, generator=generator, return_logits=return_logits)


__all__ = ["CausalLMMixin", "GenerationStep", "generate", "sample_next",
           "stream_generate"]
