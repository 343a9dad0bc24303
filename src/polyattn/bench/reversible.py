"""`polyattn bench reversible`: training memory against depth, standard blocks against reversible ones
(`polyattn.layers.reversible`), and what the recomputation costs in step time.

Per model (`--models`, registered names with a `reversible` flag) and depth (`--depths`): one training step
(forward, loss, backward) of the standard model and of the same model with `reversible=True` at the same width,
on random inputs (32 px images in 8 × 8 patches; 256-token sequences). Memory: on CUDA the peak allocated memory
of the step above the model and its inputs (`torch.cuda.max_memory_allocated`); on a CPU the bytes autograd keeps
for backward (`SavedTensorBytes`: the activations, what depth multiplies; the backward pass's own temporaries are
not in it). Time: the median of `--repeats` steps after a warm-up. Benchmarks never assert times.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..analysis.plots import pyplot
from .common import (
    SavedTensorBytes,
    add_machine_arguments,
    bench_header,
    median,
    save_figure,
    synchronize,
    time_call,
    use_machine,
    write_results,
)

VISION = {"img_size": 32, "patch_size": 4, "num_classes": 10}
TEXT = {"vocab_size": 256}
TEXT_TOKENS = 256  # tokens per sequence of the language-model rows
MODELS = {"vit_tiny": VISION, "illama_tiny": VISION, "lightnet_vision_tiny": VISION, "llama_lm_tiny": TEXT,
          "lightnet_lm_tiny": TEXT}


def loss_closure(model: torch.nn.Module, kwargs: dict, batch: int, generator: torch.Generator,
                 device: torch.device):
    """`() -> loss` of one training step on random data: images and labels (classifiers), or tokens and their
    next-token targets (language models)."""
    if "vocab_size" in kwargs:
        tokens = torch.randint(0, kwargs["vocab_size"], (batch, TEXT_TOKENS), generator=generator).to(device)
        return lambda: model(tokens, tokens)[1]
    images = torch.randn(batch, 3, kwargs["img_size"], kwargs["img_size"], generator=generator).to(device)
    labels = torch.randint(0, kwargs["num_classes"], (batch,), generator=generator).to(device)
    return lambda: torch.nn.functional.cross_entropy(model(images), labels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench/reversible"), help="output directory")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["vit_tiny", "lightnet_vision_tiny", "llama_lm_tiny", "lightnet_lm_tiny"])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32], help="numbers of blocks")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point; the median is reported")
    parser.add_argument("--quick", action="store_true", help="smoke test: depths 2 and 4, batch 2, 1 repeat")
    add_machine_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


def training_step_memory(model: torch.nn.Module, loss, device: torch.device, repeats: int) -> dict:
    """Peak memory of one training step of `loss()` (see the module docstring) and the median step time."""
    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()

    step()  # warm-up: allocates the gradients, so the peak below is the step's own
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        memory = torch.cuda.max_memory_allocated(device) - base
    else:
        model.zero_grad(set_to_none=True)
        with SavedTensorBytes() as saved:
            value = loss()
        value.backward()
        memory = saved.bytes
    return {"memory_bytes": memory, "step_s": median(time_call(step, device, repeats))}


def run(args) -> int:
    from ..registry import create_model

    device = use_machine(args)
    if args.quick:
        args.depths, args.batch, args.repeats = [2, 4], 2, 1
    memory = "peak allocated (CUDA)" if device.type == "cuda" else "bytes saved for backward (CPU)"
    header = bench_header(device, batch=args.batch, repeats=args.repeats, memory=memory)
    points = []
    for name in args.models:
        kwargs = MODELS[name]
        for depth in sorted(args.depths):
            for reversible in (False, True):
                torch.manual_seed(args.seed)
                model = create_model(name, depth=depth, reversible=reversible, **kwargs).to(device).train()
                loss = loss_closure(model, kwargs, args.batch, torch.Generator().manual_seed(args.seed), device)
                result = training_step_memory(model, loss, device, args.repeats)
                points.append({"model": name, "depth": depth, "reversible": reversible, **result})
                print(f"{name} depth {depth} {'reversible' if reversible else 'standard'}: "
                      f"{result['memory_bytes'] / 2**20:.1f} MiB, {result['step_s'] * 1e3:.0f} ms/step", flush=True)
                del model
    write_results(args.out, "reversible", {"header": header, "points": points}, format_table(points, header),
                  lambda path: plot(points, path, header))
    return 0


def format_table(points: list[dict], header: dict) -> str:
    lines = [f"**Training step, standard against reversible blocks: {header['memory']} (MiB) and step time (ms), "
             f"batch {header['batch']}, {header['device_name']}, {header['threads']} threads, median of "
             f"{header['repeats']}**", "",
             "| model | depth | standard MiB | reversible MiB | standard ms | reversible ms | time ratio |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(p["model"] for p in points):
        for depth in sorted({p["depth"] for p in points if p["model"] == name}):
            std, rev = (next(p for p in points if (p["model"], p["depth"], p["reversible"]) == (name, depth, r))
                        for r in (False, True))
            lines.append(f"| {name} | {depth} | {std['memory_bytes'] / 2**20:.1f} | {rev['memory_bytes'] / 2**20:.1f} "
                         f"| {std['step_s'] * 1e3:.0f} | {rev['step_s'] * 1e3:.0f} | "
                         f"{rev['step_s'] / std['step_s']:.2f} |")
    return "\n".join(lines)


def plot(points: list[dict], path: Path, header: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(p["model"] for p in points):
        for reversible, style in ((False, "o-"), (True, "s--")):
            pts = [p for p in points if p["model"] == name and p["reversible"] == reversible]
            label = f"{name} {'reversible' if reversible else 'standard'}"
            axes[0].plot([p["depth"] for p in pts], [p["memory_bytes"] / 2**20 for p in pts], style, label=label)
            axes[1].plot([p["depth"] for p in pts], [p["step_s"] * 1e3 for p in pts], style, label=label)
    axes[0].set_ylabel(f"MiB ({header['memory']})")
    axes[1].set_ylabel("ms per training step")
    for ax in axes:
        ax.set_xlabel("depth (blocks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = (f"reversible blocks, batch {header['batch']}, {header['device_name']}, torch {header['torch']}, "
             f"{header['git']}")
    save_figure(fig, path, title)


__all__ = ["MODELS", "add_arguments", "loss_closure", "run", "training_step_memory"]
