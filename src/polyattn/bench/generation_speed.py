"""Decoding speed of a causal LM at a given context length: prefill once, then tokens per second of cached steps.

What a user of a long-context model feels: with a prompt of `context` tokens already processed, how fast do new
tokens come? Softmax attention's per-token cost grows with the context (its KV cache), LightNet's recurrent state
does not, and the Perceiver family's cache strategies sit in between. The prompt is random token ids: speed does
not depend on the text. Greedy decoding, batch 1, with the precision the run trained in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..models.generation import stream_generate
from .common import median

CONTEXTS = (256, 4096)


@torch.no_grad()
def decode_speed(model: torch.nn.Module, vocab_size: int, context: int, *, new_tokens: int = 256, repeats: int = 5,
                 autocast=None, seed: int = 0) -> dict[str, float]:
    """`{"prefill_s", "tokens_per_s"}`: median seconds to process a `context`-token prompt, and median decode
    throughput over `new_tokens` cached steps after it (the first new token, which comes from the prefill, is not
    counted), over `repeats` timed runs after one untimed one (first calls pay one-off costs). A tiny model decodes
    a token in a few milliseconds, so fewer tokens or repeats leave the rate to the machine's noise (64 tokens and
    3 repeats gave rates 30% apart at two contexts for a state of constant size)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab_size, (1, context), generator=generator).to(device)
    prefill, rates = [], []
    for run in range(repeats + 1):
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            steps = stream_generate(model, prompt, new_tokens + 1)
            t0 = time.perf_counter()
            next(steps)
            t1 = time.perf_counter()
            for _ in steps:
                pass
            t2 = time.perf_counter()
        if run:
            prefill.append(t1 - t0)
            rates.append(new_tokens / (t2 - t1))
    return {"prefill_s": median(prefill), "tokens_per_s": median(rates)}


def generation_measures(run_dir: Path, contexts: tuple[int, ...] = CONTEXTS) -> dict[str, Any]:
    """Decoding speed of a finished causal-LM run at each context length (for `polyattn bench compare`)."""
    from ..hardware import autocast_for
    from ..train.loop import load_run_model, run_precision

    model, config = load_run_model(run_dir)
    autocast = autocast_for(run_precision(config, torch.device("cpu")), torch.device("cpu"))
    vocab = config.model.args["vocab_size"]  # the run's config holds every constructor argument
    return {"generation": {str(c): decode_speed(model, vocab, c, autocast=autocast) for c in contexts}}
