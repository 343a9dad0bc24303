"""`polyattn bench adaptive`: quality against compute of the adaptive models, with the wall time it takes.

Vision (`--vision RUN_DIR ...`: runs of an early-exit classifier, `model.early_exit=true`,
`polyattn.layers.early_exit`): for each threshold of `--thresholds`, `--images` images evenly spaced over the test
split are classified with the per-input exit; a row has the top-1 accuracy, the mean number of blocks an input ran
(the share of the blocks' FLOPs spent; the exits' norm and shared head, one linear map, are not counted) and the
wall time of the evaluation's forward passes (median of `--repeats`), against threshold 1.0, the full model.

Language models (`--lm RUN_DIR ...`: causal LM runs, Mixture-of-Depths ones (`model.mod_capacity`,
`polyattn.layers.mod`) and a plain one to compare with): the validation loss over the first `--tokens` scored
tokens in eval mode, where a routed block computes the tokens its causal predictor chooses (the model as it
would sample), the mean number of blocks a token ran (an unrouted block counts 1, a routed one the share of
tokens it computed) and the wall time of the evaluation (median of `--repeats`). Benchmarks never assert times.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..analysis.plots import pyplot
from ..errors import UserError
from .common import (
    add_machine_arguments,
    bench_header,
    median,
    save_figure,
    time_call,
    use_machine,
    write_results,
)

THRESHOLDS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]  # top softmax probabilities; 10 classes start at 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="runs of early-exit classifiers (model.early_exit=true)")
    parser.add_argument("--lm", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="causal LM runs: Mixture-of-Depths ones (model.mod_capacity) and a plain one")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS,
                        help="exit thresholds of the vision rows (1.0 = the full model)")
    parser.add_argument("--images", type=int, default=10000, help="test images per vision row (default: 10000)")
    parser.add_argument("--tokens", type=int, default=65536, help="scored tokens per LM row (default: 65536)")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per row; the median is reported")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/adaptive"), help="output directory")
    add_machine_arguments(parser)


def _timed(fn, device: torch.device, repeats: int):
    """`(fn()'s result, the median seconds of `repeats` further calls)`: the first call is the warm-up, and the
    evaluations are deterministic, so its result is every call's."""
    result = fn()
    return result, median(time_call(fn, device, repeats))


def vision_rows(run_dir: Path, thresholds: list[float], n_images: int, repeats: int,
                device: torch.device) -> list[dict]:
    """One row per threshold of an early-exit classifier run (module docstring)."""
    from ..tasks import build_job
    from ..train.loop import load_run

    run = load_run(run_dir, device=device)
    model, config = run.model, run.config
    if not getattr(model, "early_exit", False):
        raise UserError(f"{run_dir} is a run of {config.model.name} without exits; train one with "
                        f"model.early_exit=true (e.g. `polyattn train vit_early_exit_cifar10`).")
    job = build_job(config, device=device, splits=("test",), run_dir=run_dir)
    data = job.datasets["test"]
    n = min(n_images, len(data.images))
    # evenly spaced over the split, which may be stored class by class: every class is in a smaller subset
    index = torch.linspace(0, len(data.images) - 1, n).round().long()
    images, labels = data.images[index], data.labels[index]
    bs = job.eval_batch_size
    batches = [(job.eval_transform(images[i:i + bs]), labels[i:i + bs])
               for i in range(0, n, bs)]  # normalised once, outside the timed evaluations
    depth = len(model.blocks)
    rows = []
    for threshold in sorted(thresholds):
        model.exit_threshold = threshold
        metrics, seconds = _timed(lambda: job.task.evaluate(model, batches, device=device), device, repeats)
        rows.append({"run": str(run_dir), "model": config.model.name, "threshold": threshold, "depth": depth,
                     "blocks": metrics["blocks"], "top1": metrics["top1"], "images": metrics["count"],
                     "seconds": seconds})
        print(f"{run_dir.name} threshold {threshold}: {metrics['blocks']:.2f}/{depth} blocks, top-1 "
              f"{metrics['top1']:.4f}, {seconds:.2f} s", flush=True)
    return rows


def lm_row(run_dir: Path, n_tokens: int, repeats: int, device: torch.device) -> dict:
    """The row of a causal LM run (module docstring): validation loss, blocks per token, wall time."""
    from ..tasks import build_job
    from ..tasks.causal_lm import evaluate_lm
    from ..train.loop import load_run

    run = load_run(run_dir, device=device)
    model, config = run.model, run.config
    job = build_job(config, device=device, splits=("val",), run_dir=run_dir)
    routers = getattr(model, "mod", None) or {}
    computed = {"tokens": 0, "selected": 0}

    def count(_module, _inputs, output):  # the Routing each routed block returns
        computed["selected"] += int(output[2].selected.sum())
        computed["tokens"] += output[2].selected.numel()

    def evaluate():
        computed.update(tokens=0, selected=0)
        return evaluate_lm(model, job.splits["val"], job.tokenizer, seq_len=job.seq_len,
                           batch_size=job.eval_batch_size, device=device, max_tokens=n_tokens)

    hooks = [m.register_forward_hook(count) for m in routers.values()]
    try:
        metrics, seconds = _timed(evaluate, device, repeats)
    finally:
        for h in hooks:
            h.remove()
    depth = len(model.blocks)
    share = computed["selected"] / computed["tokens"] if routers else 1.0  # per routed block, on average
    blocks = depth - len(routers) + len(routers) * share
    capacity = getattr(model, "mod_capacity", None)
    print(f"{run_dir.name} capacity {capacity}: {blocks:.2f}/{depth} blocks, val loss {metrics['loss']:.4f}, "
          f"{seconds:.2f} s", flush=True)
    return {"run": str(run_dir), "model": config.model.name, "capacity": capacity, "depth": depth,
            "routed_share": share, "blocks": blocks, "loss": metrics["loss"], "tokens": n_tokens,
            "seconds": seconds}


def run(args) -> int:
    if not args.vision and not args.lm:
        raise UserError("Nothing to measure: pass --vision RUN_DIR (an early-exit classifier run) and/or --lm "
                        "RUN_DIR ... (causal LM runs with and without model.mod_capacity).")
    device = use_machine(args)
    header = bench_header(device, repeats=args.repeats, images=args.images, tokens=args.tokens)
    vision = [row for d in args.vision for row in vision_rows(d, args.thresholds, args.images, args.repeats, device)]
    lm = [lm_row(d, args.tokens, args.repeats, device) for d in args.lm]
    write_results(args.out, "adaptive", {"header": header, "vision": vision, "lm": lm},
                  format_tables(vision, lm, header), lambda path: plot(vision, lm, path, header))
    return 0


def format_tables(vision: list[dict], lm: list[dict], header: dict) -> str:
    """The markdown tables of the vision and LM rows (the time ratio against the full / plain model)."""
    parts = []
    if vision:
        lines = [f"**Early exit: top-1 against blocks per input, {vision[0]['images']} test images, "
                 f"{header['device_name']}, {header['threads']} threads, median of {header['repeats']}**", "",
                 "| run | threshold | blocks / input | top-1 | eval s | time vs full |", "|---|---|---|---|---|---|"]
        for r in vision:
            full = next((f for f in vision if f["run"] == r["run"] and f["threshold"] == 1.0), None)
            ratio = f"{r['seconds'] / full['seconds']:.2f}" if full else "–"
            lines.append(f"| {Path(r['run']).name} ({r['model']}) | {r['threshold']:g} | {r['blocks']:.2f} / "
                         f"{r['depth']} | {r['top1']:.4f} | {r['seconds']:.2f} | {ratio} |")
        parts.append("\n".join(lines))
    if lm:
        plain = next((r for r in lm if r["capacity"] is None), None)
        lines = [f"**Mixture-of-Depths: validation loss against blocks per token, {lm[0]['tokens']} tokens, "
                 f"causal (predictor) routing, {header['device_name']}, {header['threads']} threads, median of "
                 f"{header['repeats']}**", "",
                 "| run | capacity | routed share | blocks / token | val loss | eval s | time vs plain |",
                 "|---|---|---|---|---|---|---|"]
        for r in lm:
            ratio = f"{r['seconds'] / plain['seconds']:.2f}" if plain else "–"
            cap = "–" if r["capacity"] is None else f"{r['capacity']:g}"
            lines.append(f"| {Path(r['run']).name} ({r['model']}) | {cap} | {r['routed_share']:.3f} | "
                         f"{r['blocks']:.2f} / {r['depth']} | {r['loss']:.4f} | {r['seconds']:.2f} | {ratio} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(vision: list[dict], lm: list[dict], path: Path, header: dict) -> None:
    plt = pyplot()
    panels = [p for p in (("vision", vision), ("lm", lm)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels):
        for run in dict.fromkeys(r["run"] for r in rows):
            pts = sorted((r for r in rows if r["run"] == run), key=lambda r: r["blocks"])
            y = [r["top1"] if kind == "vision" else r["loss"] for r in pts]
            ax.plot([r["blocks"] for r in pts], y, "o-", label=Path(run).name)
            for r, v in zip(pts, y):
                tag = f"t={r['threshold']:g}" if kind == "vision" else f"c={r['capacity']}"
                ax.annotate(f"{tag}, {r['seconds']:.1f}s", (r["blocks"], v), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("blocks per input" if kind == "vision" else "blocks per token")
        ax.set_ylabel("top-1 accuracy" if kind == "vision" else "validation loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, f"adaptive computation, {header['device_name']}, torch {header['torch']}, "
                           f"{header['git']}")


__all__ = ["THRESHOLDS", "add_arguments", "format_tables", "lm_row", "run", "vision_rows"]
