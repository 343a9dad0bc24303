"""`polyattn bench dtypes`: the internal dtype decisions of the ops, each measured both ways on this device.

polyattn makes a few choices of product dtype inside its ops that depend on whether the CPU computes bfloat16
natively (`polyattn.hardware.native_bf16`). This suite takes each choice both ways at the shapes it was decided
at, so the decision can be checked on any machine (the README records it on each CPU kind):

- `attention_short`: bfloat16 attention with few keys, forward+backward: the explicit matmul-softmax-matmul (chosen
  up to a number of keys set per CPU kind where bfloat16 is native, `ops.attention.EXPLICIT_MAX_KEYS_CPU`) against
  SDPA (chosen otherwise), 8 × T × 4 heads of 32, causal.
- `lightnet_global`: non-causal LightNet forward+backward with bfloat16 inputs: its products in bfloat16 (where
  native) against float32 (elsewhere), 1 × T × 4 heads of 64.
- `chunk_core`: causal LightNet forward+backward with bfloat16 inputs: the chunk core's products in bfloat16
  against float32 (chosen on every CPU), 8 × 1024 × 4 heads of 32.

Each point: median of `--repeats` calls after one warm-up; the choice polyattn makes here is marked. Benchmarks
never assert times.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from ..hardware import native_bf16
from .common import bench_header, median, time_call, use_machine, write_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench/dtypes"), help="output directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke test: small shapes, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu (the choices are CPU choices; default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


@contextlib.contextmanager
def _taken(module, name: str, replacement):
    """Takes one of an op's decisions the other way for the duration (the op reads it at call time)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _fwd_bwd(fn, *inputs):
    def call():
        out = fn(*inputs)
        out.float().sum().backward()
        for x in inputs:
            x.grad = None
    return call


def _randn(*shape, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()


def cases(quick: bool, device: torch.device):
    """(decision, shape label, {option: callable}, the option polyattn picks here)."""
    from ..ops import attention as attention_ops
    from ..ops import chunk_gated
    from ..ops.attention import attention
    from ..ops.lightnet import lightnet_attn

    native = native_bf16(device)
    for T in ((17,) if quick else (65, 129, 257)):
        q, k, v = (_randn(2 if quick else 8, T, 4, 32, device=device, seed=i) for i in range(3))
        yield ("attention_short", f"{q.shape[0]} × {T} × 4 × 32",
               {"explicit": _fwd_bwd(lambda q, k, v: attention(q, k, v, mask_mode="causal", backend="explicit"),
                                     q, k, v),
                "sdpa": _fwd_bwd(lambda q, k, v: attention(q, k, v, mask_mode="causal", backend="sdpa"), q, k, v)},
               attention_ops._pick_backend(attention_ops.Backend.AUTO, attention_ops.MaskMode.CAUSAL, q, T).value)
    for T in ((64,) if quick else (1024, 4096)):
        q, k, v = (_randn(1, T, 4, 64, device=device, seed=i) for i in range(3))
        call = _fwd_bwd(lambda q, k, v: lightnet_attn(q, k, v, causal=False)[0], q, k, v)

        def taken(value, call=call):
            def run():
                with _taken(chunk_gated, "native_bf16", lambda device: value):
                    call()
            return run

        yield ("lightnet_global", f"1 × {T} × 4 × 64", {"bf16 products": taken(True), "fp32 products": taken(False)},
               "bf16 products" if native else "fp32 products")
    B, T = (2, 128) if quick else (8, 1024)
    q, k, v = (_randn(B, T, 4, 32, device=device, seed=i) for i in range(3))
    call = _fwd_bwd(lambda q, k, v: lightnet_attn(q, k, v, causal=True)[0], q, k, v)

    def core(keep_low_precision: bool):
        def run():
            rule = (lambda device, dtype: dtype) if keep_low_precision else chunk_gated.core_dtype
            with _taken(chunk_gated, "core_dtype", rule), _taken(chunk_gated, "native_bf16", lambda device: True):
                call()
        return run

    yield ("chunk_core", f"{B} × {T} × 4 × 32", {"bf16 products": core(True), "fp32 products": core(False)},
           "fp32 products")


def run(args) -> int:
    device = use_machine(args)
    repeats = 1 if args.quick else args.repeats
    header = bench_header(device, native_bf16=native_bf16(device), repeats=repeats)
    rows = []
    for decision, shape, options, chosen in cases(args.quick, device):
        times = {}
        for option, call in options.items():
            call()  # warm-up
            times[option] = median(time_call(call, device, repeats))
        fastest = min(times, key=times.get)
        rows.append({"decision": decision, "shape": shape, "seconds": times, "chosen": chosen, "fastest": fastest})
        cells = ", ".join(f"{o} {t * 1e3:.1f} ms" for o, t in times.items())
        print(f"{decision} {shape}: {cells}; polyattn picks {chosen}"
              f"{'' if chosen == fastest else f' (fastest here: {fastest})'}", flush=True)
    write_results(args.out, "dtypes", {"header": header, "rows": rows}, format_table(rows, header))
    return 0


def format_table(rows: list[dict], header: dict) -> str:
    lines = [f"**Internal dtype choices, {header['device_name']}, {header['threads']} threads, native bfloat16: "
             f"{'yes' if header['native_bf16'] else 'no'}, fwd+bwd median of {header['repeats']}**", "",
             "| decision | shape | option A | option B | polyattn picks | fastest |", "|---|---|---|---|---|---|"]
    for r in rows:
        (a, ta), (b, tb) = r["seconds"].items()
        lines.append(f"| {r['decision']} | {r['shape']} | {a}: {ta * 1e3:.1f} ms | {b}: {tb * 1e3:.1f} ms | "
                     f"{r['chosen']} | {r['fastest']} |")
    return "\n".join(lines)


__all__ = ["add_arguments", "cases", "run"]
