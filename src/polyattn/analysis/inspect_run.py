"""`polyattn inspect RUN_DIR`: attention maps, attention-map ranks and calibration of a trained image classifier.

Writes into `OUT` (default `RUN_DIR/inspect/`):

    inspect.json            every number below, with the settings that produced it
    reliability.png         reliability diagram of the evaluated split, with its ECE
    attention_rank.png      attention-map rank per layer
    attention/image_K.png   input K and, per layer, the map of what the model reads from each patch

Calibration: the split is evaluated as `polyattn eval` does (same weights, transform and precision), and the
top-1 confidences are binned as in `polyattn.tasks.classification.reliability_bins`.

Attention (see `polyattn.analysis.attention_maps`): maps are taken in float32 for `rank_images` images of the
split (round-robin over the classes, in dataset order). The rank per layer follows the iLLaMA paper: the mean
map over those images, `[H, T, T]`, its singular values, and the smallest k whose k largest values hold 80 % of
their sum — for each head, and for the head-averaged map ("rank", what the figure shows). The paper reports
layer 1, head 1 over 30 ImageNet validation images (ViT-T ≈ 81, iLLaMA-T ≈ 129 of 197 tokens). The figures
show the first `n_images` of those images: for a model with a class token, its row over the patch tokens; for
a mean-pooled model (LightNet, multi-scan), the mean over the query rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_write_text
from ..hardware import autocast_for, resolve_device
from ..registry import model_task, parameter_count
from ..train.loop import announce, inference_precision, load_run, load_run_config, run_header
from ..train.run_log import format_table
from .attention_maps import attention_rank, patch_grid_map, record_attention_maps, token_layout
from .plots import attention_figure, pyplot, rank_figure, reliability_diagram

RANK_THRESHOLD = 0.8
MAP_CHUNK = 8  # images per forward pass while maps are recorded


def spread_over_classes(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of `n` samples taken round-robin over the classes (each class's samples in dataset order)."""
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in torch.unique(labels).tolist()]
    picked: list[int] = []
    for depth in range(max((len(ix) for ix in by_class), default=0)):
        picked += [ix[depth] for ix in by_class if depth < len(ix)]
        if len(picked) >= n:
            break
    return torch.tensor(picked[:n], dtype=torch.long)


def inspect_run(run_dir: Path, *, n_images: int = 4, rank_images: int = 30, split: str = "test",
                out_dir: Path | None = None, device_name: str = "auto", precision: str = "auto",
                ema: bool | None = None) -> dict[str, Any]:
    """Writes the files listed in the module docstring and returns the contents of inspect.json."""
    from ..tasks import build_job

    if n_images < 0:
        raise UserError(f"--n-images must be 0 or more, got {n_images}.")
    if rank_images < 1:
        raise UserError(f"--rank-images must be at least 1, got {rank_images}.")
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    task = model_task(config.model.name)
    if task != "classification":
        raise UserError(f"{run_dir} holds a {task} model ('{config.model.name}'); `polyattn inspect` needs an "
                        f"image classifier run.")
    pyplot()  # fail before the work if matplotlib is missing
    device = resolve_device(device_name)
    run = load_run(run_dir, ema=ema, device=device)
    model, config = run.model, run.config
    resolved = inference_precision(precision, device, config)
    out = Path(out_dir) if out_dir is not None else run_dir / "inspect"
    title = f"{config.model.name} on {config.data.source} ({split})"

    job = build_job(config, device=device, splits=(split,), run_dir=run_dir)
    announce(run_header("inspecting", config, parameter_count(model), job, device,
                        precision=resolved, weights=run.weights, extra=f"split {split}, into {out}"), resolved)
    metrics = job.evaluate(model, split, autocast=autocast_for(resolved, device), reliability=True,
                           progress=True)
    bins = metrics.pop("reliability")
    reliability_diagram(bins, out / "reliability.png", ece=metrics["ece"], title=title)

    dataset = job.datasets[split]
    index = spread_over_classes(dataset.labels, max(n_images, rank_images))
    n_rank, n_shown = min(rank_images, len(index)), min(n_images, len(index))
    raw = dataset.images[index]  # uint8 (n, C, H, W)
    images = job.eval_transform(raw)
    layout = token_layout(model, tuple(images.shape[-2:]))
    # Chunks bound the memory of the maps ([chunk, H, T, T] per layer); kept: the sum over the rank images,
    # and the patch-grid maps of the shown ones.
    sums: dict[str, torch.Tensor] = {}
    grids: dict[str, list[torch.Tensor]] = {}
    predicted = []
    with torch.no_grad(), record_attention_maps(model) as captured:
        for start in range(0, len(index), MAP_CHUNK):
            predicted.append(model(images[start:start + MAP_CHUNK].to(device)).argmax(-1).cpu())
            for name, m in captured.items():  # (chunk, H, T, T)
                m = m.cpu()
                sums[name] = sums.get(name, 0) + m[:max(n_rank - start, 0)].sum(0)
                grids.setdefault(name, []).append(patch_grid_map(m[:max(n_shown - start, 0)], layout))
    names = list(sums)
    layers = []
    for name in names:
        mean_map = sums[name] / n_rank  # (H, T, T), the paper's mean over images
        layers.append({
            "layer": name,
            "rank": int(attention_rank(mean_map.mean(0), RANK_THRESHOLD)),
            "rank_per_head": attention_rank(mean_map, RANK_THRESHOLD).tolist(),
        })
    num_tokens = sums[names[0]].shape[-1]
    rank_figure([r["rank"] for r in layers], num_tokens, out / "attention_rank.png",
                title=f"{title}: attention-map rank", threshold=RANK_THRESHOLD)

    what = ("class-token attention over the patches, heads averaged" if layout.query is not None
            else "mean attention of all queries over the patches, heads averaged")
    short = [_short_layer_name(name) for name in names]
    shown = {name: torch.cat(grids[name]) for name in names}  # (n_shown, rows, cols)
    predicted = torch.cat(predicted)
    figures = []
    for i in range(n_shown):
        label, guess = int(dataset.labels[index[i]]), int(predicted[i])
        path = out / "attention" / f"image_{i}.png"
        attention_figure(raw[i], [shown[name][i] for name in names], short, path,
                         title=f"{title}, sample {int(index[i])}: label {dataset.classes[label]}, "
                               f"predicted {dataset.classes[guess]}", what=what)
        figures.append({"file": str(path.relative_to(out)), "sample": int(index[i]), "label": label,
                        "predicted": guess})

    report = {
        "run": str(run_dir),
        "model": config.model.name,
        "split": split,
        "metrics": dict(metrics),
        "reliability": {
            "edges": bins.edges.tolist(),
            "confidence": [_finite(v) for v in bins.confidence.tolist()],
            "accuracy": [_finite(v) for v in bins.accuracy.tolist()],
            "count": bins.count.tolist(),
        },
        "attention": {
            "tokens": num_tokens,
            "grid": list(layout.grid),
            "query": "class token" if layout.query is not None else "mean over queries",
            "rank_threshold": RANK_THRESHOLD,
            "rank_images": n_rank,
            "layers": layers,
            "figures": figures,
        },
    }
    atomic_write_text(out / "inspect.json", json.dumps(report, indent=2) + "\n")
    rows = [(f"{split} {k}", f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    rows += [(f"rank {_short_layer_name(r['layer'])}", f"{r['rank']} of {num_tokens}") for r in layers]
    rows.append(("written to", str(out)))
    print(format_table(rows, f"inspect {title}"))
    return report


def _short_layer_name(name: str) -> str:
    """'blocks.3.attn' → 'layer 3'."""
    parts = name.split(".")
    return f"layer {parts[1]}" if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit() else name


def _finite(value: float) -> float | None:
    """NaN (an empty bin) → None, which JSON can hold."""
    return None if math.isnan(value) else value
