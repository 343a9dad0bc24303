"""`polyattn bench mixers`: time and memory of token mixers against the number of tokens (LightNet, arXiv 2405.21022).

Mixers, all at the op level on the same `[B, T, H, d]` inputs (default B = 1, D = 256 = 4 heads × 64):
softmax SDPA (bidirectional and causal), LightNet global (non-causal, one scan), LightNet causal (chunked),
kernelized linear attention with the elu+1 map (global and chunked causal), and the multiplicative decay scan
over 1, 2 and 4 directions of the grid. The token counts are square grids
(16×16 … 256×256 = 256 … 64K tokens), so the same points serve the sequence-length sweep (1-D mixers use the
row-major order) and the grid sweep (the 4-scan cross-scan needs the 2-D grid).

Per point: one warm-up call, then the median of `--repeats` calls (one call when a call takes longer than a
second). A point whose time, predicted from the previous size (quadratic for SDPA, linear otherwise), exceeds
`--time-cap` seconds is skipped and recorded as skipped with its prediction. Benchmarks never assert times.

Memory: on CUDA the peak allocated memory of the call (`torch.cuda.max_memory_allocated`, above the inputs); on
a CPU the bytes autograd saves for backward (`SavedTensorBytes`; forward+backward rows only).
"""

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..analysis.plots import pyplot
from ..hardware import native_bf16
from ..ops.decay_scan import multi_scan_decay_attn
from ..ops.lightnet import lightnet_attn
from ..ops.linear_attn import elu_feature_map, linear_attn
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

MIXERS = ["sdpa", "sdpa_causal", "lightnet", "lightnet_causal", "linear_elu", "linear_elu_causal", "scan1", "scan2",
          "scan4"]
QUADRATIC = {"sdpa", "sdpa_causal"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench/mixers"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16×16 and 32×32 grids, one repeat")
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                        help="grid sides (tokens = side²)")
    parser.add_argument("--mixers", nargs="+", default=MIXERS, choices=MIXERS)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: float32, and bfloat16 where the device computes it natively")
    parser.add_argument("--width", type=int, default=256, help="model width D = heads × head dim")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-cap", type=float, default=15.0,
                        help="skip points whose predicted time per call exceeds this many seconds")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk length of the causal/scan forms")
    parser.add_argument("--seed", type=int, default=0)
    add_machine_arguments(parser, threads_help="torch intra-op threads (default: torch's choice); 1 is steadier on "
                          "a shared CPU")


def make_mixer(name: str, side: int, chunk_size: int) -> Callable[..., torch.Tensor]:
    """`f(q, k, v, g) -> o` on `[B, T, H, d]` tensors (g: log-decays for the multiplicative scans)."""
    if name in QUADRATIC:
        causal = name == "sdpa_causal"
        return lambda q, k, v, g: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    if name.startswith("lightnet"):
        causal = name == "lightnet_causal"
        return lambda q, k, v, g: lightnet_attn(q, k, v, causal=causal, chunk_size=chunk_size)[0]
    if name.startswith("linear_elu"):
        causal = name == "linear_elu_causal"
        return lambda q, k, v, g: linear_attn(elu_feature_map(q), elu_feature_map(k), v, causal=causal,
                                              chunk_size=chunk_size)[0]
    directions = int(name[4:])
    return lambda q, k, v, g: multi_scan_decay_attn(q, k, v, g, grid_shape=(side, side), directions=directions,
                                                    chunk_size=chunk_size)


def measure(name: str, side: int, dtype: torch.dtype, backward: bool, args, device: torch.device) -> dict:
    """Times one (mixer, size, dtype, mode) point; returns seconds (median) and memory in MiB."""
    T, H = side * side, args.heads
    d = args.width // H
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.batch, T, H, d)
    q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
    g = F.logsigmoid(torch.randn(shape, generator=gen, device=device) + 3).to(dtype)
    inputs = [x.requires_grad_(backward) for x in (q, k, v, g)]
    fn = make_mixer(name, side, args.chunk_size)

    def call():
        if backward:
            o = fn(*inputs)
            o.backward(torch.ones_like(o))
            for x in inputs:
                x.grad = None
        else:
            with torch.no_grad():
                fn(*inputs)

    mem = None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif backward:
        with SavedTensorBytes() as saved:
            o = fn(*inputs)
        mem = saved.bytes / 2**20
        del o
        call()
    else:
        call()  # warm-up
    first = time_call(call, device, 1)[0]
    repeats = args.repeats if first < 1.0 else 1
    times = [first] if repeats == 1 else time_call(call, device, repeats)
    return {"seconds": median(times), "times": times, "mem_mib": mem}


def run(args) -> int:
    if args.quick:
        args.sides, args.repeats = [16, 32], 1
    device = use_machine(args)
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if native_bf16(device) else ["float32"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    header = bench_header(device, width=args.width, heads=args.heads, head_dim=args.width // args.heads,
                          batch=args.batch, chunk_size=args.chunk_size, time_cap_s=args.time_cap,
                          repeats=args.repeats, dtypes=args.dtypes, sides=args.sides,
                          memory=("peak allocated (CUDA)" if device.type == "cuda"
                                  else "saved-for-backward bytes (CPU; fwd+bwd rows only)"))
    print("# polyattn bench mixers — " + ", ".join(f"{k}={v}" for k, v in header.items()))
    points: list[dict] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            for name in args.mixers:
                prev = None
                for side in sorted(args.sides):
                    T = side * side
                    rec = {"mixer": name, "dtype": dtype_name, "mode": mode, "tokens": T, "grid": f"{side}x{side}"}
                    if prev is not None:
                        power = 2 if name in QUADRATIC else 1
                        predicted = prev["seconds"] * (T / prev["tokens"]) ** power
                        if predicted > args.time_cap:
                            rec.update(skipped=True, predicted_seconds=predicted)
                            points.append(rec)
                            prev = {"seconds": predicted, "tokens": T}
                            continue
                    rec.update(skipped=False, **measure(name, side, dtype, backward, args, device))
                    points.append(rec)
                    prev = {"seconds": rec["seconds"], "tokens": T}
                    print(f"  {dtype_name:8s} {mode:7s} {name:15s} {rec['grid']:>9s} {T:6d} tok "
                          f"{rec['seconds'] * 1e3:10.1f} ms", flush=True)
    ratios = compute_ratios(points)
    write_results(out, "mixers", {"header": header, "points": points, "ratios": ratios["values"]},
                  format_table(points, args) + "\n\n" + "\n".join(ratios["lines"]),
                  lambda path: plot(points, path, header))
    return 0


def _seconds(points, mixer, dtype, mode, tokens) -> float | None:
    for p in points:
        if (p["mixer"], p["dtype"], p["mode"], p["tokens"]) == (mixer, dtype, mode, tokens) and not p["skipped"]:
            return p["seconds"]
    return None


def compute_ratios(points: list[dict]) -> dict:
    """The three numbers the issue asks for (targets in brackets), per dtype, where both points were measured."""
    values, lines = {}, ["ratios (targets from issue 3; measured, not asserted):"]

    def ratio(key, label, num, den, target):
        r = None if num is None or den is None else num / den
        values[key] = r
        lines.append(f"  {label}: {'n/a (point missing)' if r is None else f'{r:.2f}'}  [target {target}]")

    for dt in ("float32", "bfloat16"):
        for mixer in ("lightnet", "lightnet_causal"):
            ratio(f"{mixer}_t16k_over_t1k_{dt}", f"{mixer} fwd+bwd t(16K)/t(1K) {dt}",
                  _seconds(points, mixer, dt, "fwd+bwd", 16384), _seconds(points, mixer, dt, "fwd+bwd", 1024),
                  "≤ 20")
        ratio(f"sdpa_causal_over_lightnet_causal_16k_{dt}", f"causal SDPA / causal LightNet fwd+bwd at 16K {dt}",
              _seconds(points, "sdpa_causal", dt, "fwd+bwd", 16384),
              _seconds(points, "lightnet_causal", dt, "fwd+bwd", 16384), "≥ 10")
        for mode in ("fwd", "fwd+bwd"):
            ratio(f"scan4_over_lightnet_64x64_{mode}_{dt}", f"4-scan / 1-scan LightNet on 64×64 {mode} {dt}",
                  _seconds(points, "scan4", dt, mode, 4096), _seconds(points, "lightnet", dt, mode, 4096), "≥ 3")
    return {"values": values, "lines": lines}


def format_table(points: list[dict], args) -> str:
    """Markdown table: one row per (dtype, mode, mixer), one column per size; ms and (fwd+bwd) MiB."""
    sides = sorted(args.sides)
    head = "| dtype | mode | mixer | " + " | ".join(f"{s}×{s} ({_tokens(s * s)})" for s in sides) + " |"
    rows = [head, "|" + "---|" * (3 + len(sides))]
    for dt in args.dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for name in args.mixers:
                cells = []
                for s in sides:
                    p = next((p for p in points if (p["mixer"], p["dtype"], p["mode"], p["tokens"])
                              == (name, dt, mode, s * s)), None)
                    if p is None:
                        cells.append("")
                    elif p["skipped"]:
                        cells.append(f"skip (~{p['predicted_seconds']:.0f} s)")
                    else:
                        mem = "" if p["mem_mib"] is None else f" / {p['mem_mib']:.0f} MiB"
                        cells.append(f"{p['seconds'] * 1e3:.1f} ms{mem}")
                rows.append(f"| {dt} | {mode} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def plot(points: list[dict], path: Path, header: dict) -> None:
    """Log-log time vs tokens, one panel per (dtype, mode). matplotlib is imported here (an optional extra)."""
    plt = pyplot()

    panels = sorted({(p["dtype"], p["mode"]) for p in points}, key=lambda x: (x[0] != "float32", x[1]))
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, (dt, mode) in zip(axes.flat, panels):
        for name in MIXERS:
            pts = [p for p in points if (p["mixer"], p["dtype"], p["mode"]) == (name, dt, mode) and not p["skipped"]]
            if pts:
                ax.loglog([p["tokens"] for p in pts], [p["seconds"] for p in pts], "o-", label=name)
        ax.set_title(f"{dt}, {mode}")
        ax.set_xlabel("tokens (grid side²)")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    title = (f"token mixers, D={header['width']} ({header['heads']} heads), batch {header['batch']}, "
             f"{header['device_name']}, torch {header['torch']}, {header['git']}")
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
