"""PNG figures of `polyattn inspect`: reliability diagram, attention maps over the patch grid, ranks per layer;
and the lines of a comparison suite whose rows vary a length (`polyattn bench compare`'s `curves.png`). `pyplot`
is how every figure of polyattn (the benchmarks' too) gets matplotlib.

matplotlib (the `log` extra) is imported on first use, with the Agg backend (no display needed). Every figure
is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..tasks.classification import ReliabilityBins


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a UserError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("Drawing figures needs matplotlib, which is not installed; install it with pip install "
                        "'polyattn[log]'.") from err
    return plt


def _save(fig, path: Path) -> None:
    from ..files import atomic_save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)


def reliability_diagram(bins: ReliabilityBins, path: Path, *, ece: float, title: str) -> None:
    """Accuracy per confidence bin against the diagonal (perfect calibration), with each bin's share of the
    samples below it (Guo et al., arXiv 1706.04599, Fig. 1)."""
    plt = pyplot()
    edges = bins.edges.numpy()
    lo, width = edges[:-1], edges[1:] - edges[:-1]
    filled = bins.count.numpy() > 0
    accuracy = bins.accuracy.nan_to_num(0.0).numpy()
    confidence = bins.confidence.nan_to_num(0.0).numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.6, 5.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lo[filled], accuracy[filled], width=width[filled], align="edge", color="tab:blue", edgecolor="black",
            linewidth=0.5, label="accuracy")
    top.bar(lo[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width[filled],
            align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {ece:.4f}", fontsize=9)
    top.legend(loc="upper left", fontsize=7)
    share = bins.count.double() / max(int(bins.count.sum()), 1)
    bottom.bar(lo, share.numpy(), width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("share")
    _save(fig, path)


def attention_figure(image: torch.Tensor, layer_maps: Sequence[torch.Tensor], layer_names: Sequence[str],
                     path: Path, *, title: str, what: str) -> None:
    """One input image (uint8 `[C, H, W]`) and beside it, per layer, its map over the patch grid (`[rows, cols]`),
    each with a colour bar (the layers' scales differ, and LightNet's maps can be negative)."""
    plt = pyplot()
    n = len(layer_maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.5), squeeze=False)
    axes = axes[0]
    picture = image.permute(1, 2, 0).numpy()
    if picture.shape[-1] == 1:
        axes[0].imshow(picture[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axes[0].imshow(picture)
    axes[0].set_title("input", fontsize=8)
    for ax, grid, name in zip(axes[1:], layer_maps, layer_names):
        shown = ax.imshow(grid.numpy(), cmap="viridis")
        ax.set_title(name, fontsize=7)
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=6)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}\n{what}", fontsize=8, y=1.08)
    _save(fig, path)


def rank_figure(ranks: Sequence[int], num_tokens: int, path: Path, *, title: str, threshold: float) -> None:
    """Attention-map rank per layer, with the number of tokens (the largest possible rank) for scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * len(ranks) + 1.5), 3.0))
    ax.bar(range(len(ranks)), list(ranks), color="tab:blue")
    ax.axhline(num_tokens, color="black", linestyle="--", linewidth=1, label=f"tokens ({num_tokens})")
    ax.set_xticks(range(len(ranks)))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"rank at {threshold:.0%} of Σσ")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def line_panels(lines: Mapping[str, Sequence[Sequence[tuple[float, float]]]], path: Path, *, x_label: str,
                y_labels: Sequence[str], title: str, log_x: bool = True, markers: bool = True) -> None:
    """One panel per y label, side by side, sharing an x axis (log-2 unless `log_x` is False): every entry of
    `lines` is one labelled line with a list of `(x, y)` points per panel (points are drawn sorted by x, with a
    marker each unless `markers` is False; a line without points in a panel is left out of it, keeping its colour
    in the others)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(y_labels), figsize=(5.2 * len(y_labels) + 2.2, 4.2), squeeze=False)
    for i, (label, panels) in enumerate(lines.items()):
        for ax, points in zip(axes[0], panels, strict=False):
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o" if markers else None, color=f"C{i % 10}", label=label)
    for ax, y_label in zip(axes[0], y_labels, strict=True):
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
