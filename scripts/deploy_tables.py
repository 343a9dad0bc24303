"""Measures the README "Deploy" tables: each quantization method against the float run, per run directory.

    PYTHONPATH=src python scripts/deploy_tables.py [--finetune-steps N] [--skip-quantize] RUN_DIR [RUN_DIR ...]

For every run: `polyattn quantize` with each method into RUN_DIR-METHOD (unless --skip-quantize) and `polyattn
prune` at two shares, with `--finetune-steps N` also fine-tuned (RUN_DIR-pruned<share>-ftN; kept if present),
then the quality of
`evaluate_run` (top-1 or validation loss), the size of model.safetensors, the median time of one forward over a
fixed evaluation batch and, for causal LMs, of one greedy decoding step (64-token prompt, 64 new tokens), all in
the precision `auto` resolves to here; for LLaMA-style runs also the int8 KV cache: greedy agreement with the
float cache over 128 tokens and the cache's bytes. Timings are medians of a few repeats; on a shared machine they
are indications, not benchmarks.
"""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

from polyattn.bench.common import median, time_call
from polyattn.deploy.prune import prune_run
from polyattn.deploy.quantize import METHODS, quantize_run
from polyattn.hardware import autocast_for, resolve_device
from polyattn.registry import model_task, parameter_count
from polyattn.train.loop import evaluate_run, inference_precision, load_run

CPU = torch.device("cpu")


def median_ms(fn, repeats=7):
    """Median milliseconds of `repeats` calls of `fn` without autograd, after one warm-up call."""
    with torch.no_grad():
        fn()
        return median(time_call(fn, CPU, repeats)) * 1e3


def measure(run_dir: Path) -> dict:
    device = resolve_device("cpu")
    run = load_run(run_dir)
    model, config = run.model, run.config
    task = model_task(config.model.name)
    precision = inference_precision("auto", device, config)
    autocast = autocast_for(precision, device)
    with redirect_stdout(io.StringIO()):
        metrics = evaluate_run(run_dir, device_name="cpu",  # LMs: the first 20,000 validation tokens
                               overrides=None if task == "classification" else ["data.eval_tokens=20000"])
    quality = metrics.get("top1", metrics.get("loss"))
    row = {"quality": quality, "size_mb": Path(run.source).stat().st_size / 2**20, "params": parameter_count(model),
           "precision": precision.name}
    g = torch.Generator().manual_seed(0)
    if task == "classification":
        pe = model.patch_embed
        x = torch.randn(256, pe.in_chans, *pe.img_size, generator=g)
        with autocast():
            row["forward_ms"] = median_ms(lambda: model(x))
    else:
        x = torch.randint(0, 256, (8, config.data.seq_len), generator=g)
        with autocast():
            row["forward_ms"] = median_ms(lambda: model(x))
            prompt = torch.randint(0, 256, (1, 64), generator=g)
            t = median_ms(lambda: model.generate(prompt, 64), repeats=3)
            prefill = median_ms(lambda: model.generate(prompt, 1), repeats=3)
            row["decode_ms_per_token"] = (t - prefill) / 63
    return row


def kv_int8(run_dir: Path) -> dict:
    from polyattn.layers import int8_kv_cache
    from polyattn.models.generation import generate, stream_generate

    model = load_run(run_dir).model
    prompt = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = generate(model, prompt, 128)[0, 64:]
    got = torch.stack([s.tokens for s in stream_generate(model, prompt, 128, cache_transform=int8_kv_cache)], 1)[0]
    same = int((ref == got).cumprod(0).sum())
    _, cache = model.forward_cached(torch.cat([prompt, ref[None]], 1))
    floats = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in cache)
    return {"identical_prefix": same, "agree": float((ref == got).float().mean()), "float_kib": floats / 1024,
            "int8_kib": sum(c.nbytes() for c in int8_kv_cache(cache)) / 1024}


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--skip-quantize", action="store_true")
    args = parser.parse_args(argv)
    runs, finetune = args.runs, args.finetune_steps
    torch.set_num_threads(1)
    print(f"CPU threads {torch.get_num_threads()}, torch {torch.__version__}")
    for run in map(Path, runs):
        base = measure(run)
        print(f"\n{run.name}: float {base}")
        print("| method | quality | Δ | parameters | size (MiB) | forward (ms) | speed-up | decode (ms/token) "
              "| speed-up |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = [("float", base)]
        for method in () if args.skip_quantize else METHODS:
            out = run.with_name(f"{run.name}-{method}")
            if not out.exists():
                quantize_run(run, method, out)
            rows.append((method, measure(out)))
        for share in (0.25, 0.5):
            out = run.with_name(f"{run.name}-pruned{share:g}")
            tuned = out.with_name(f"{out.name}-ft{finetune}")
            if not out.exists():
                prune_run(run, share, share, out, finetune_steps=finetune)
            rows.append((f"pruned {share:g} heads/{share:g} MLP, no fine-tune", measure(out)))
            if finetune:
                rows.append((f"pruned {share:g} heads/{share:g} MLP, {finetune} fine-tune steps", measure(tuned)))
        for method, r in rows:
            dec = r.get("decode_ms_per_token")
            print(f"| {method} | {r['quality']:.4f} | {r['quality'] - base['quality']:+.4f} | "
                  f"{r['params'] / 1e6:.3f}M | {r['size_mb']:.2f} | "
                  f"{r['forward_ms']:.1f} | {base['forward_ms'] / r['forward_ms']:.2f}x | "
                  + (f"{dec:.2f} | {base['decode_ms_per_token'] / dec:.2f}x |" if dec else "– | – |"))
        if "llama" in load_run(run).config.model.name:
            print("int8 KV cache:", kv_int8(run))


if __name__ == "__main__":
    main(sys.argv[1:])
