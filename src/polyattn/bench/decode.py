"""`polyattn bench decode`: per-token decoding latency against context length, for each kind of decoding state.

What a long-context model costs a user once the prompt is in: softmax attention's KV cache grows with the context,
so each new token reads more of it; LightNet's recurrent state (arXiv 2405.21022) is a fixed-size matrix per head,
so its per-token cost should not depend on the context; PerceiverAR's cache (arXiv 2202.07765) sits in between
(it recomputes its latent stack once the window is full), and the same model decoded without a cache (each step
the forward of its whole window) shows what that cache saves. The models are the LM benchmark's shape (width 256,
4 layers, 4 heads, byte vocabulary) with random weights: latency does not depend on what was learned.

Per point (model, batch, context): the prompt of `context` random tokens is prefilled once through
`forward_cached` (not timed), then `--steps` single-token steps are timed one by one, each feeding back the greedy
token; the median step is the latency. Points whose prefill is predicted (from the previous context, quadratic
for softmax attention, linear otherwise) to exceed `--prefill-cap` seconds are skipped and recorded as such.
Benchmarks never assert times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..analysis.plots import pyplot
from ..hardware import PRECISIONS, autocast_for, resolve_precision
from .common import (
    add_machine_arguments,
    bench_header,
    median,
    save_figure,
    synchronize,
    use_machine,
    write_results,
)

LM = {"vocab_size": 256, "dim": 256, "depth": 4, "num_heads": 4}
MODELS = {
    "kv_cache": ("llama_lm_tiny", LM, "LLaMA-style, KV cache"),
    "lightnet_state": ("lightnet_lm_tiny", LM, "LightNet, recurrent state"),
    "perceiver_ar": ("perceiver_ar_tiny", {**LM, "max_seq_len": 1024, "num_latents": 512},
                     "PerceiverAR (1024 window, 512 latents), exact cache"),
    "perceiver_ar_recomputed": ("perceiver_ar_tiny", {**LM, "max_seq_len": 1024, "num_latents": 512},
                                "PerceiverAR (1024 window, 512 latents), no cache: the window recomputed"),
}
QUADRATIC_PREFILL = {"kv_cache"}
# Rows that decode without a state: every step is the plain forward of the last `max_seq_len` tokens, what the
# cache of the row above it saves (its cross-attend keys/values, reused while the window holds).
UNCACHED = {"perceiver_ar_recomputed"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench/decode"), help="output directory")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384],
                        help="prompt lengths in tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=16, help="timed single-token steps per point (median)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast of the decoding steps (default: auto for this device)")
    parser.add_argument("--prefill-cap", type=float, default=120.0,
                        help="skip points whose predicted prefill exceeds this many seconds")
    parser.add_argument("--quick", action="store_true", help="smoke test: contexts 32 and 64, batch 1, 2 steps")
    add_machine_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


@torch.no_grad()
def decode_latency(model: torch.nn.Module, vocab_size: int, batch: int, context: int, steps: int,
                   device: torch.device, autocast, generator: torch.Generator, cached: bool = True) -> dict:
    """Prefills `context` random tokens for `batch` sequences, then times `steps` cached single-token steps
    (`cached=False`: each step is the plain forward of the last `model.max_seq_len` tokens, no prefill)."""
    prompt = torch.randint(0, vocab_size, (batch, context), generator=generator).to(device)
    if not cached:
        return _uncached_latency(model, prompt, steps, device, autocast)
    with autocast():
        t0 = time.perf_counter()
        logits, cache = model.forward_cached(prompt)
        state = {"token": logits[:, -1].argmax(-1, keepdim=True), "cache": cache}
        synchronize(device)
        prefill = time.perf_counter() - t0

        def step():
            logits, state["cache"] = model.forward_cached(state["token"], state["cache"])
            state["token"] = logits[:, -1].argmax(-1, keepdim=True)

        times = _timed_steps(step, steps, device)
    return {"prefill_s": prefill, "step_s": median(times), "times": times}


def _uncached_latency(model: torch.nn.Module, tokens: torch.Tensor, steps: int, device: torch.device,
                      autocast) -> dict:
    window, state = model.max_seq_len, {"tokens": tokens}

    def step():
        token = model(state["tokens"][:, -window:])[:, -1].argmax(-1, keepdim=True)
        state["tokens"] = torch.cat([state["tokens"], token], 1)

    with autocast():
        times = _timed_steps(step, steps, device)
    return {"prefill_s": 0.0, "step_s": median(times), "times": times}


def _timed_steps(step, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` calls of `step()`, after one untimed warm-up call (new shapes)."""
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def run(args) -> int:
    from ..registry import create_model

    device = use_machine(args)
    precision = resolve_precision(args.precision, device)
    if args.quick:
        args.contexts, args.batches, args.steps = [32, 64], [1], 2
    header = bench_header(device, precision=precision.name, precision_reason=precision.reason, steps=args.steps)
    autocast = autocast_for(precision, device)
    points = []
    for key in args.models:
        name, model_args, _ = MODELS[key]
        torch.manual_seed(args.seed)
        model = create_model(name, **model_args).to(device).eval()
        for batch in args.batches:
            last = None  # (context, prefill seconds) of the previous point
            for context in sorted(args.contexts):
                point = {"model": key, "registered": name, "batch": batch, "context": context}
                if last is not None:
                    growth = (context / last[0]) ** (2 if key in QUADRATIC_PREFILL else 1)
                    predicted = last[1] * growth
                    if predicted > args.prefill_cap:
                        points.append({**point, "skipped": True, "predicted_prefill_s": predicted})
                        print(f"{key} batch {batch} context {context}: skipped (prefill ~{predicted:.0f} s)")
                        continue
                result = decode_latency(model, model_args["vocab_size"], batch, context, args.steps, device,
                                        autocast, torch.Generator().manual_seed(args.seed),
                                        cached=key not in UNCACHED)
                last = (context, result["prefill_s"])
                points.append({**point, "skipped": False, **result,
                               "tokens_per_s": batch / result["step_s"]})
                print(f"{key} batch {batch} context {context}: {result['step_s'] * 1e3:.2f} ms/token step "
                      f"({batch / result['step_s']:.0f} tokens/s), prefill {result['prefill_s']:.1f} s", flush=True)
    ratios = flatness(points)
    write_results(args.out, "decode", {"header": header, "points": points, "ratios": ratios},
                  format_table(points, header, ratios), lambda path: plot(points, path, header))
    return 0


def flatness(points: list[dict]) -> dict[str, float]:
    """Per (model, batch): step latency at the longest measured context ÷ at the shortest (target for LightNet at
    16K against 256: ≤ 1.2)."""
    out = {}
    for key in dict.fromkeys(p["model"] for p in points):
        for batch in dict.fromkeys(p["batch"] for p in points):
            measured = sorted((p for p in points if p["model"] == key and p["batch"] == batch and not p["skipped"]),
                              key=lambda p: p["context"])
            if len(measured) >= 2:
                first, last = measured[0], measured[-1]
                out[f"{key}_batch{batch}_{last['context']}_over_{first['context']}"] = last["step_s"] / first["step_s"]
    return out


def format_table(points: list[dict], header: dict, ratios: dict[str, float]) -> str:
    contexts = sorted({p["context"] for p in points})
    lines = [f"**Decoding latency per step (ms), {header['device_name']}, {header['threads']} threads, "
             f"{header['precision']}, median of {header['steps']} steps**", "",
             "| state | batch | " + " | ".join(_tokens(c) for c in contexts) + " | last / first |",
             "|---|---|" + "---|" * (len(contexts) + 1)]
    for key in dict.fromkeys(p["model"] for p in points):
        for batch in dict.fromkeys(p["batch"] for p in points):
            cells = []
            for c in contexts:
                p = next((p for p in points if (p["model"], p["batch"], p["context"]) == (key, batch, c)), None)
                cells.append("" if p is None else "skip" if p["skipped"] else f"{p['step_s'] * 1e3:.2f}")
            ratio = next((v for k, v in ratios.items() if k.startswith(f"{key}_batch{batch}_")), None)
            lines.append(f"| {MODELS[key][2]} | {batch} | " + " | ".join(cells) +
                         f" | {'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(points: list[dict], path: Path, header: dict) -> None:
    """Latency against context, log-log, one panel per batch size."""
    plt = pyplot()

    batches = list(dict.fromkeys(p["batch"] for p in points))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes.flat, batches):
        for key in dict.fromkeys(p["model"] for p in points):
            pts = [p for p in points if p["model"] == key and p["batch"] == batch and not p["skipped"]]
            if pts:
                ax.loglog([p["context"] for p in pts], [p["step_s"] * 1e3 for p in pts], "o-", label=MODELS[key][2])
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decoding step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    title = (f"decoding latency: {header['device_name']}, {header['threads']} threads, {header['precision']}, "
             f"{header['git']}")
    save_figure(fig, path, title)


__all__ = ["MODELS", "UNCACHED", "add_arguments", "decode_latency", "run"]
