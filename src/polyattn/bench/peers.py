"""`polyattn bench peers`: polyattn's training step against the pure-PyTorch libraries a user would pick instead.

Pairs, each at the same shape, width, depth, heads and MLP width:

- LLaMA-style decoder (RMSNorm, SwiGLU, RoPE, SDPA attention), batch 8 × 1,024 tokens, D 256, 4 layers: polyattn's
  `llama_lm` against x-transformers' `TransformerWrapper(Decoder(...))` with the same choices.
- ViT-Ti at 32 px with 4×4 patches, batch 128: polyattn's `vit_tiny` against x-transformers' `ViTransformerWrapper`
  (which mean-pools instead of using a class token: 64 tokens against 65).
- PerceiverAR, window 1,024 with 512 latents, D 256, one cross-attend layer + 3 latent layers: polyattn's
  `perceiver_ar` against perceiver-ar-pytorch's `PerceiverAR`.

Both sides take the same step (`bench.training.training_step`: forward under the precision's autocast, the same
loss, backward, AdamW) on the same synthetic batch. Their steps are timed interleaved, one of each per repeat,
so the machine's drift affects both alike; the ratio is polyattn's median step time ÷ the peer's (below 1 =
polyattn faster). Peers are an optional extra (`pip install polyattn[bench]`); a missing one is skipped with a
message. Benchmarks never assert times.

`--breakdown` also profiles one more step of each side (torch.profiler, self time of every op) and splits it into
softmax attention kernels (SDPA's), matrix products and everything else, so a ratio can be read against what
the two sides share: both call the same SDPA kernel and the same GEMMs, and only the rest is each library's own.
The profiler's per-op overhead inflates the many small ops of "other", so the split is a guide, not a timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..analysis.plots import pyplot
from ..hardware import PRECISIONS, Precision
from .common import (
    add_machine_arguments,
    bench_header,
    median,
    save_figure,
    synchronize,
    use_machine,
    write_results,
)
from .training import WORKLOADS, Workload, quick, requested_precisions, synthetic_step, training_step


def _llama_peer(w: Workload) -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    dim = w.args["dim"]
    hidden = -(-8 * dim // 3 // 64) * 64  # polyattn's LLaMA width: 8D/3 rounded up to a multiple of 64
    return TransformerWrapper(num_tokens=w.args["vocab_size"], max_seq_len=w.seq_len, use_abs_pos_emb=False,
                              attn_layers=Decoder(dim=dim, depth=w.args["depth"], heads=w.args["num_heads"],
                                                  attn_dim_head=dim // w.args["num_heads"], rotary_pos_emb=True,
                                                  attn_flash=True, use_rmsnorm=True, ff_glu=True, ff_swish=True,
                                                  ff_no_bias=True, ff_mult=hidden / dim))


def _vit_peer(w: Workload) -> nn.Module:
    from x_transformers import Encoder, ViTransformerWrapper

    from ..registry import resolve_model_args

    a = resolve_model_args(w.model, **w.args)
    return ViTransformerWrapper(image_size=a["img_size"], patch_size=a["patch_size"], num_classes=a["num_classes"],
                                channels=a["in_chans"],
                                attn_layers=Encoder(dim=a["embed_dim"], depth=a["depth"], heads=a["num_heads"],
                                                    attn_dim_head=a["embed_dim"] // a["num_heads"], attn_flash=True,
                                                    ff_mult=a["mlp_ratio"]))


def _perceiver_peer(w: Workload) -> nn.Module:
    from perceiver_ar_pytorch import PerceiverAR

    a = w.args
    return PerceiverAR(num_tokens=a["vocab_size"], dim=a["dim"], depth=a["depth"] - 1, heads=a["num_heads"],
                       dim_head=a["dim"] // a["num_heads"], max_seq_len=a["max_seq_len"],
                       cross_attn_seq_len=a["max_seq_len"] - a["num_latents"], perceive_depth=1, ff_mult=4)


@dataclass(frozen=True)
class Pair:
    name: str
    workload: str  # a bench.training workload: polyattn's side
    peer: str  # the peer's description
    module: str  # the package the peer needs
    build: Callable[[Workload], nn.Module]


PAIRS = [
    Pair("llama_decoder", "llama_lm", "x-transformers Decoder (RMSNorm, SwiGLU, RoPE, flash)", "x_transformers",
         _llama_peer),
    Pair("vit", "vit_tiny", "x-transformers ViTransformerWrapper", "x_transformers", _vit_peer),
    Pair("perceiver_ar", "perceiver_ar", "perceiver-ar-pytorch PerceiverAR", "perceiver_ar_pytorch",
         _perceiver_peer),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [p.name for p in PAIRS]
    parser.add_argument("--out", type=Path, default=Path("runs/bench/peers"), help="output directory")
    parser.add_argument("--pairs", nargs="+", default=names, choices=names)
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=[*PRECISIONS, "native"],
                        help="as for `bench train` (default: auto)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each side; medians are compared")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side before timing")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 2, 128 tokens, 1 repeat")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile one step of each side: attention kernels, matrix products, the rest")
    add_machine_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


# Self time of these ops is "attention" (SDPA's kernels on CPU and CUDA) and "products" (GEMMs) in a breakdown.
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
PRODUCT_OPS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm",
                         "aten::_addmm_activation", "aten::mkldnn_linear"})


def step_breakdown(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Seconds of one profiled `step` by kind of op: `attention`, `products` and `other` (self time, so nothing is
    counted twice; device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    seconds = {"attention": 0.0, "products": 0.0, "other": 0.0}
    for event in prof.key_averages():
        spent = (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e6
        if any(op in event.key for op in ATTENTION_OPS):
            seconds["attention"] += spent
        elif event.key in PRODUCT_OPS:
            seconds["products"] += spent
        else:
            seconds["other"] += spent
    return seconds


def measure_pair(pair: Pair, workload: Workload, precision: Precision, args, device: torch.device) -> dict:
    from ..registry import create_model, model_task

    task = model_task(workload.model)
    torch.manual_seed(args.seed)
    ours = create_model(workload.model, **workload.args).to(device).train()
    peer = pair.build(workload).to(device).train()
    steps = {}
    for side, model in (("polyattn", ours), ("peer", peer)):
        loss_fn, _, _ = synthetic_step(model, task, workload, device, torch.Generator().manual_seed(args.seed))
        steps[side] = training_step(model, loss_fn, precision, device)
    peer_error = None
    try:
        steps["peer"]()
    except RuntimeError as err:  # e.g. a peer that cannot run under bfloat16 autocast: polyattn is still timed
        peer_error = f"{type(err).__name__}: {err}"
        del steps["peer"]
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {side: [] for side in steps}
    for _ in range(args.repeats):
        for side, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times[side].append(time.perf_counter() - t0)
    ours_s = median(times["polyattn"])
    peer_s = median(times["peer"]) if "peer" in times else None
    breakdown = {side: step_breakdown(step, device) for side, step in steps.items()} if args.breakdown else None
    return {"pair": pair.name, "workload": workload.name, "peer": pair.peer, "precision": precision.name,
            "batch": workload.batch, "seq_len": workload.seq_len if task != "classification" else None,
            "polyattn_params": sum(p.numel() for p in ours.parameters()),
            "peer_params": sum(p.numel() for p in peer.parameters()),
            "polyattn_seconds": ours_s, "peer_seconds": peer_s, "ratio": None if peer_s is None else ours_s / peer_s,
            "peer_error": peer_error, "polyattn_times": times["polyattn"], "peer_times": times.get("peer"),
            "breakdown": breakdown}


def run(args) -> int:
    device = use_machine(args)
    precisions = requested_precisions(args.precisions, device)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    workloads = {w.name: (quick(w) if args.quick else w) for w in WORKLOADS}
    header = bench_header(device, precisions={p.name: p.reason for p in precisions}, repeats=args.repeats,
                          warmup=args.warmup)
    rows, skipped = [], []
    for pair in (p for p in PAIRS if p.name in args.pairs):
        if importlib.util.find_spec(pair.module) is None:
            skipped.append(pair.name)
            print(f"{pair.name}: skipped, {pair.module} is not installed (pip install 'polyattn[bench]')")
            continue
        for precision in precisions:
            row = measure_pair(pair, workloads[pair.workload], precision, args, device)
            rows.append(row)
            print(f"{pair.name} [{precision.name}]: {format_result(row)}", flush=True)
    write_results(args.out, "peers", {"header": header, "rows": rows, "skipped": skipped}, format_table(rows, header),
                  (lambda path: plot(rows, path, header)) if rows else None)  # no plot when every peer was skipped
    return 0


def format_result(row: dict) -> str:
    ours = f"polyattn {row['polyattn_seconds'] * 1e3:.0f} ms"
    if row["peer_error"]:
        return f"{ours}, peer failed ({row['peer_error'][:120]})"
    return f"{ours}, peer {row['peer_seconds'] * 1e3:.0f} ms, ratio {row['ratio']:.2f}"


def format_table(rows: list[dict], header: dict) -> str:
    lines = [f"**Training step against peers, {header['device_name']}, {header['threads']} threads, torch "
             f"{header['torch']}, median of {header['repeats']} interleaved steps**", "",
             "| pair | peer | shape | precision | params polyattn / peer (M) | polyattn ms | peer ms | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['batch']} × {r['seq_len']}" if r["seq_len"] else f"batch {r['batch']}"
        peer = "fails" if r["peer_error"] else f"{r['peer_seconds'] * 1e3:.0f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['pair']} | {r['peer']} | {shape} | {r['precision']} | {r['polyattn_params'] / 1e6:.2f} / "
                     f"{r['peer_params'] / 1e6:.2f} | {r['polyattn_seconds'] * 1e3:.0f} | {peer} | {ratio} |")
    lines += ["", "ratio = polyattn's step time ÷ the peer's (target ≤ 0.8)."]
    errors = {r["peer"]: r["peer_error"] for r in rows if r["peer_error"]}
    lines += [f"{peer} fails in {', '.join(r['precision'] for r in rows if r['peer'] == peer and r['peer_error'])}: "
              f"`{error.splitlines()[0][:160]}`." for peer, error in errors.items()]
    split = [r for r in rows if r.get("breakdown")]
    if split:
        lines += ["", "**Where one profiled step goes (self time, ms; profiler overhead inflates 'other')**", "",
                  "| pair | precision | side | attention | products | other | total |", "|---|---|---|---|---|---|---|"]
        for r in split:
            for side, parts in r["breakdown"].items():
                total = sum(parts.values())
                cells = " | ".join(f"{parts[k] * 1e3:.0f} ({parts[k] / total:.0%})"
                                   for k in ("attention", "products", "other"))
                lines.append(f"| {r['pair']} | {r['precision']} | {side} | {cells} | {total * 1e3:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, header: dict) -> None:
    plt = pyplot()

    rows = [r for r in rows if r["ratio"] is not None]
    labels = [f"{r['pair']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows)), 4.2))
    ax.bar(labels, [r["ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="grey", lw=1)
    ax.axhline(0.8, color="tab:green", lw=1, ls="--", label="target 0.8")
    ax.set_ylabel("polyattn step time / peer step time")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, f"polyattn vs peers: {header['device_name']}, {header['threads']} threads, {header['git']}")


__all__ = ["PAIRS", "add_arguments", "measure_pair", "run"]
