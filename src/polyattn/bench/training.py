"""`polyattn bench train`: training-step throughput and model FLOPs utilisation (MFU) of every model family.

One row per workload: a registered model at a CPU size (the vision models at 32 px with 4×4 patches and batch 128;
the language models at batch 8 × 1,024 tokens, width 256, 4 layers; DiT at 32 px with 2×2 patches), trained on
synthetic inputs of that shape with the task's loss and an AdamW step, in each requested precision. Per row: the
median step time of `--repeats` steps after warm-up, samples/s and tokens/s, the FLOPs of one forward+backward
counted by `torch.utils.flop_counter` (matrix products, convolutions and attention; the optimizer step is not
counted), and MFU = achieved FLOP/s ÷ the peak of a matrix product measured in the same run in the same dtype
(the best of 1024², 2048² and 4096² at the run's thread count). Benchmarks never assert times.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.plots import pyplot
from ..hardware import PRECISIONS, Precision, autocast_for, native_bf16, resolve_precision
from ..ops.losses import cross_entropy
from .common import (
    add_machine_arguments,
    bench_header,
    median,
    save_figure,
    synchronize,
    time_call,
    use_machine,
    write_results,
)

VISION = {"img_size": 32, "patch_size": 4, "in_chans": 3, "num_classes": 10}
LM = {"vocab_size": 256, "dim": 256, "depth": 4, "num_heads": 4}


@dataclass(frozen=True)
class Workload:
    """A model at one training shape: the registered name, its constructor overrides, the batch and (for
    sequence models) the number of tokens per sample."""

    name: str
    model: str
    args: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    seq_len: int = 1024


WORKLOADS = [
    Workload("vit_tiny", "vit_tiny", VISION, batch=128),
    Workload("illama_tiny", "illama_tiny", VISION, batch=128),
    Workload("lightnet_vision_tiny", "lightnet_vision_tiny", VISION, batch=128),
    Workload("multiscan_vision_tiny", "multiscan_vision_tiny", VISION, batch=128),
    Workload("perceiver_vision_tiny", "perceiver_vision_tiny", VISION, batch=128),
    Workload("linear_vision", "linear_vision_nano", VISION, batch=128),
    Workload("llama_lm", "llama_lm_tiny", LM),
    Workload("lightnet_lm", "lightnet_lm_tiny", LM),
    Workload("linear_lm", "linear_lm_nano", LM),
    Workload("perceiver_ar", "perceiver_ar_tiny", {**LM, "max_seq_len": 1024, "num_latents": 512}),
    Workload("perceiver_double", "perceiver_double_nano", {**LM, "max_seq_len": 1024, "num_latents": 512}),
    Workload("perceiver_compressed", "perceiver_compressed_nano", {**LM, "max_seq_len": 1024, "num_latents": 512}),
    Workload("perceiver_split", "perceiver_split_nano", {**LM, "max_seq_len": 1024, "num_latents": 512}),
    Workload("llp", "llp_nano", {**LM, "max_seq_len": 1024}),
    Workload("bert", "bert_tiny", LM),
    Workload("lightnet_mlm", "lightnet_mlm_tiny", LM),
    Workload("linear_mlm", "linear_mlm_nano", LM),
    Workload("dit_softmax", "dit_nano", {"img_size": 32, "patch_size": 2, "num_classes": 10}, batch=32),
    Workload("dit_lightnet", "dit_nano", {"img_size": 32, "patch_size": 2, "num_classes": 10, "mixer": "lightnet"},
             batch=32),
]
QUICK = {"batch": 2, "seq_len": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [w.name for w in WORKLOADS]
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train"), help="output directory")
    parser.add_argument("--model", dest="models", nargs="+", default=names, choices=names, metavar="NAME",
                        help=f"workloads to run (default: all): {', '.join(names)}")
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=[*PRECISIONS, "native"],
                        help="precisions to measure; auto = what `train.precision=auto` picks on this device "
                             "(default), native = every precision the device computes natively (fp32, and bf16 "
                             "where native)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (compiled in warm-up)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 2, 128 tokens, 1 repeat")
    add_machine_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


def requested_precisions(names: list[str], device: torch.device) -> list[Precision]:
    """The distinct precisions to measure, resolved on `device` ('native' expands to fp32 plus bf16 if native)."""
    out: list[Precision] = []
    for name in names:
        if name == "native":
            expanded = ["fp32", "bf16"] if native_bf16(device) else ["fp32"]
        else:
            expanded = [name]
        for n in expanded:
            p = resolve_precision(n, device)
            if p.name not in (q.name for q in out):
                out.append(p)
    return out


def quick(workload: Workload) -> Workload:
    """The same model at smoke-test size (tests and `--quick`)."""
    args = dict(workload.args)
    if "max_seq_len" in args:
        args["max_seq_len"] = QUICK["seq_len"]
    if "num_latents" in args:
        args["num_latents"] = QUICK["seq_len"] // 2
    if workload.model.startswith("llp"):
        args["segment_len"] = QUICK["seq_len"] // 4
    if "perceiver_compressed" in workload.model:
        args["compressed_len"] = QUICK["seq_len"] // 4
    return Workload(workload.name, workload.model, args, batch=QUICK["batch"], seq_len=QUICK["seq_len"])


def synthetic_step(model: nn.Module, task: str, workload: Workload, device: torch.device,
                   generator: torch.Generator) -> tuple[Callable[[], torch.Tensor], int, int]:
    """`loss_fn() -> loss` for one batch of random inputs of the workload's shape, with the task's loss; and the
    samples and tokens per step (tokens: sequence positions the model mixes, patches for images)."""
    B, T = workload.batch, workload.seq_len
    if task == "classification":
        size, chans = workload.args.get("img_size", 32), workload.args.get("in_chans", 3)
        x = torch.randn(B, chans, size, size, generator=generator).to(device)
        y = torch.randint(0, workload.args.get("num_classes", 10), (B,), generator=generator).to(device)
        patch = workload.args.get("patch_size", 16)
        return (lambda: cross_entropy(model(x), y)), B, B * (size // patch) ** 2
    if task in ("causal_lm", "masked_lm"):
        from ..tasks.causal_lm import scored_targets

        vocab = workload.args.get("vocab_size", 256)
        tokens = torch.randint(0, vocab, (B, T + 1), generator=generator).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        if task == "masked_lm":  # the loss of BERT's task on every position: the same FLOPs as 15% of them
            return (lambda: cross_entropy(model(x), y)), B, B * T

        def lm_loss():
            logits = model(x)
            return cross_entropy(logits, scored_targets(logits, y))

        return lm_loss, B, B * T
    if task == "diffusion":
        size, patch = workload.args.get("img_size", 32), workload.args.get("patch_size", 2)
        x = torch.randn(B, 3, size, size, generator=generator).to(device)
        target = torch.randn(B, 3, size, size, generator=generator).to(device)
        t = torch.rand(B, generator=generator).to(device)
        y = torch.randint(0, workload.args.get("num_classes", 10), (B,), generator=generator).to(device)
        return (lambda: F.mse_loss(model(x, t, y).float(), target)), B, B * (size // patch) ** 2
    raise ValueError(f"no synthetic step for task {task!r}")


def training_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], precision: Precision,
                  device: torch.device) -> Callable[[], None]:
    """One optimizer step as the training loop takes it: forward under the precision's autocast, backward, AdamW."""
    from ..train.optim import build_optimizer

    optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.999))
    autocast = autocast_for(precision, device)

    def step() -> None:
        with autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(model: nn.Module, loss_fn: Callable[[], torch.Tensor], precision: Precision,
                device: torch.device) -> int:
    """FLOPs of one forward+backward (torch.utils.flop_counter: products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # one block: the mode clears its counts each time it is entered
        with autocast_for(precision, device)():
            loss = loss_fn()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_step(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    return time_call(step, device, repeats)


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes=(1024, 2048, 4096), repeats: int = 5,
                warmup_s: float = 1.0) -> dict:
    """The best FLOP/s of a square matrix product in `dtype` at the current thread count, over `sizes`.

    A second of products first: with AMX the bfloat16 rate climbs for a while (four back-to-back measurements in
    one process gave 789, 789, 1088 and 2054 GFLOP/s without it), so an unwarmed peak understates it up to 2x.
    """
    n = max(sizes)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        a @ b
        synchronize(device)
    best = {"flops_per_s": 0.0, "size": None}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        seconds = min(time_call(lambda a=a, b=b: a @ b, device, repeats))
        rate = 2 * n**3 / seconds
        if rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "size": n}
    return best


def measure(workload: Workload, precision: Precision, args, device: torch.device, peak: float) -> dict:
    """Times one workload in one precision; returns the row."""
    from ..registry import create_model, model_task

    torch.manual_seed(args.seed)
    task = model_task(workload.model)
    model = create_model(workload.model, **workload.args).to(device).train()
    forward_model = torch.compile(model) if args.compile else model
    loss_fn, samples, tokens = synthetic_step(forward_model, task, workload, device,
                                              torch.Generator().manual_seed(args.seed))
    flops = count_flops(model, synthetic_step(model, task, workload, device,
                                              torch.Generator().manual_seed(args.seed))[0], precision, device)
    times = time_step(training_step(model, loss_fn, precision, device), device, args.warmup, args.repeats)
    seconds = median(times)
    achieved = flops / seconds
    sequence = task in ("causal_lm", "masked_lm")
    return {"workload": workload.name, "model": workload.model, "task": task, "precision": precision.name,
            "batch": workload.batch, "seq_len": workload.seq_len if sequence else None,
            "params": sum(p.numel() for p in model.parameters()), "seconds": seconds, "times": times,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "flops_per_step": flops,
            "achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "mfu": achieved / peak if peak else None,
            "compiled": bool(args.compile)}


def run(args) -> int:
    device = use_machine(args)
    precisions = requested_precisions(args.precisions, device)
    workloads = [w for w in WORKLOADS if w.name in args.models]
    if args.quick:
        workloads, args.repeats, args.warmup = [quick(w) for w in workloads], 1, 1
    peaks = {}
    for p in precisions:
        dtype = p.autocast_dtype or torch.float32
        peaks[p.name] = (matmul_peak(dtype, device, sizes=(256,), warmup_s=0.0) if args.quick
                         else matmul_peak(dtype, device))
        print(f"peak {p.name}: {peaks[p.name]['flops_per_s'] / 1e9:.1f} GFLOP/s ({peaks[p.name]['size']}² product)")
    header = bench_header(device, precisions={p.name: p.reason for p in precisions}, repeats=args.repeats,
                          warmup=args.warmup, compiled=bool(args.compile), peaks=peaks)
    rows = []
    for w in workloads:
        for p in precisions:
            row = measure(w, p, args, device, peaks[p.name]["flops_per_s"])
            rows.append(row)
            print(format_row(row), flush=True)
    write_results(args.out, "train", {"header": header, "rows": rows}, format_table(rows, header),
                  lambda path: plot(rows, path, header))
    return 0


def format_row(row: dict) -> str:
    mfu = "" if row["mfu"] is None else f", MFU {row['mfu'] * 100:.1f}%"
    return (f"{row['workload']} [{row['precision']}]: {row['seconds'] * 1e3:.0f} ms/step, "
            f"{row['samples_per_s']:.1f} samples/s, {row['tokens_per_s']:.0f} tokens/s{mfu}")


def format_table(rows: list[dict], header: dict) -> str:
    """Markdown: one row per (workload, precision)."""
    lines = [f"**Training step, {header['device_name']}, {header['threads']} threads, torch {header['torch']}, "
             f"median of {header['repeats']}{', compiled' if header['compiled'] else ''}**", "",
             "| model | shape | precision | params (M) | ms/step | samples/s | tokens/s | GFLOP/step | GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['batch']} × {r['seq_len']}" if r["seq_len"] else f"batch {r['batch']}"
        mfu = "" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        lines.append(f"| {r['workload']} | {shape} | {r['precision']} | {r['params'] / 1e6:.2f} | "
                     f"{r['seconds'] * 1e3:.0f} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['flops_per_step'] / 1e9:.1f} | {r['achieved_flops_per_s'] / 1e9:.1f} | {mfu} |")
    peaks = ", ".join(f"{k} {v['flops_per_s'] / 1e9:.0f} GFLOP/s" for k, v in header["peaks"].items())
    lines += ["", f"Peak (matrix product, same run): {peaks}."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, header: dict) -> None:
    """MFU per workload, one bar per precision. matplotlib is imported here (an optional extra)."""
    plt = pyplot()

    names = list(dict.fromkeys(r["workload"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    width = 0.8 / max(len(precisions), 1)
    fig, (ax_mfu, ax_tok) = plt.subplots(1, 2, figsize=(max(8.0, 0.9 * len(names)) * 2, 4.8))
    for i, p in enumerate(precisions):
        xs = [j + i * width for j in range(len(names))]
        by_name = {r["workload"]: r for r in rows if r["precision"] == p}
        ax_mfu.bar(xs, [100 * (by_name[n]["mfu"] or 0) if n in by_name else 0 for n in names], width, label=p)
        ax_tok.bar(xs, [by_name[n]["tokens_per_s"] if n in by_name else 0 for n in names], width, label=p)
    for ax, label in ((ax_mfu, "MFU (% of the measured matmul peak)"), (ax_tok, "tokens/s")):
        ax.set_xticks([j + width * (len(precisions) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax_tok.set_yscale("log")
    title = (f"training step: {header['device_name']}, {header['threads']} threads, torch {header['torch']}, "
             f"{header['git']}")
    save_figure(fig, path, title)


__all__ = ["WORKLOADS", "Workload", "add_arguments", "matmul_peak", "run", "synthetic_step", "training_step"]
