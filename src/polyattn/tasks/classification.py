"""Image (or any) classification: cross-entropy loss with label smoothing (against class indices, or soft targets
from mixup/cutmix), and its metrics.

Metrics over a whole evaluation set: mean cross-entropy, top-1 and top-k accuracy (fractions in [0, 1]) and
the expected calibration error (Guo et al., arXiv 1706.04599) of the top-1 confidence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..distributed import all_gather, all_sum
from ..errors import UserError
from ..ops.losses import cross_entropy
from ..settings import checked
from .image_job import ImageTaskConfig


@dataclass
class ClassificationConfig(ImageTaskConfig):
    """The `task` section of classification."""

    label_smoothing: float = checked(0.1, ge=0, lt=1)
    """Classification: label smoothing of the cross-entropy (0 = off; DeiT: 0.1)."""
    ece_bins: int = checked(15, ge=1)
    """Classification: confidence bins of the expected calibration error and the reliability diagram."""
    eval_flip: bool = False
    """Image classification: evaluate each image and its left-right mirror image and average their logits
    (test-time augmentation; twice the evaluation cost). Needs data.hflip: a model is only evaluated on views it
    was trained on. Training is unchanged, so it can be set for one evaluation of a finished run (an override
    of polyattn eval)."""


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """{k: number of rows whose target is among the k largest logits} for logits `[B, C]`, targets `[B]`."""
    c = logits.shape[-1]
    for k in ks:
        if not 1 <= k <= c:
            raise UserError(f"Top-{k} accuracy needs 1 <= k <= the {c} classes; choose a smaller k.")
    if not ks:
        return {}
    top = logits.topk(max(ks), dim=-1).indices  # (B, kmax), best first
    hit = top == targets[:, None]
    return {k: int(hit[:, :k].any(dim=-1).sum()) for k in ks}


@dataclass
class ReliabilityBins:
    """Equal-width confidence bins (lo, hi] over [0, 1] (the first includes 0); NaN marks an empty bin."""

    edges: torch.Tensor  # float64 [n_bins + 1]
    confidence: torch.Tensor  # float64 [n_bins], mean confidence in the bin
    accuracy: torch.Tensor  # float64 [n_bins], fraction correct in the bin
    count: torch.Tensor  # int64 [n_bins]


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram and the ECE."""
    if n_bins < 1:
        raise UserError(f"The number of calibration bins must be at least 1, got {n_bins}.")
    conf = confidences.detach().flatten().to(torch.float64).cpu()
    ok = correct.detach().flatten().to(torch.float64).cpu()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)  # bin b holds (b/n, (b+1)/n]
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    ok_sum = torch.bincount(idx, weights=ok, minlength=n_bins)
    denom = count.to(torch.float64)
    empty = count == 0
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return ReliabilityBins(
        edges=torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
        confidence=torch.where(empty, nan, conf_sum / denom.clamp_min(1)),
        accuracy=torch.where(empty, nan, ok_sum / denom.clamp_min(1)),
        count=count,
    )


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Σ_b (n_b / N) · |accuracy_b − confidence_b| over equal-width bins; NaN for an empty input."""
    bins = reliability_bins(confidences, correct, n_bins)
    n = int(bins.count.sum())
    if n == 0:
        return float("nan")
    gap = (bins.accuracy - bins.confidence).abs().nan_to_num(0.0)
    return float((bins.count.to(torch.float64) * gap).sum() / n)


class ClassificationTask:
    """Loss and metrics of `num_classes`-way classification; the model maps a batch to logits `[B, C]`."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, ece_bins: int = 15):
        if num_classes < 1:
            raise UserError(f"A classification task needs at least one class, got {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"Label smoothing must be in [0, 1), got {label_smoothing}.")
        if ece_bins < 1:
            raise UserError(f"The number of calibration bins must be at least 1, got {ece_bins}.")
        self.num_classes, self.label_smoothing, self.ece_bins = num_classes, label_smoothing, ece_bins
        self.topk = (1,) if num_classes == 1 else (1, min(5, num_classes))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *,
             reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Cross-entropy with label smoothing, in float32: the mean over the samples, or their sum.

        `targets` are class indices `[B]` (int64) or class probabilities `[B, C]` (soft targets, e.g. from
        mixup); smoothing mixes either with the uniform distribution: (1 − ε)·target + ε/C.
        """
        if logits.shape[-1] != self.num_classes:
            raise UserError(f"The model gives {logits.shape[-1]} logits per sample but the task has "
                            f"{self.num_classes} classes; set the model's number of classes to match the data.")
        if targets.is_floating_point():
            if targets.shape != logits.shape:
                raise UserError(f"Soft targets of shape {tuple(targets.shape)} do not match the logits "
                                f"{tuple(logits.shape)}; give one probability per class and sample.")
            targets = targets.float()
        else:
            targets = targets.long()
        return cross_entropy(logits, targets, reduction=reduction, label_smoothing=self.label_smoothing)

    def exits_loss(self, exit_logits: torch.Tensor, targets: torch.Tensor, *,
                   reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """The deep-supervision loss of an early-exit model's exits `[E, B, C]` (first block's first): PABEE's
        weighted mean `Σ_i i·L_i / Σ_i i` of the exits' losses `L_i` (`loss`), so deeper exits weigh more
        (Zhou et al., arXiv 2006.04152, eq. 3; `polyattn.layers.early_exit`)."""
        weights = torch.arange(1, exit_logits.shape[0] + 1, dtype=torch.float32, device=exit_logits.device)
        losses = torch.stack([self.loss(z, targets, reduction=reduction) for z in exit_logits])
        return (weights * losses).sum() / weights.sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 autocast_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 reliability: bool = False, flip: bool = False) -> dict:
        """{"loss", "top1", "top{k}", "ece", "count"} over all the batches (every sample weighs the same; in a
        distributed run, the batches of every process: each passes its share, see `polyattn.distributed.shard`), and
        with `reliability` also "reliability": the `ReliabilityBins` behind the ECE (for a reliability diagram).
        An early-exit model (`early_exit`) exits each input at its `exit_threshold` and adds "blocks", the mean
        number of blocks an input ran.

        "loss" is the plain cross-entropy (negative log-likelihood, no label smoothing), so it can be compared
        across runs trained with different smoothing. k is 5, or the number of classes when fewer (no
        top-k key with a single class). Batches are moved to `device` (the model must already be there) and
        the model is called as `model(images)`, so apply any transform to the batches beforehand. With `flip`
        the logits are the mean of those of the images and of their mirror images (the last axis reversed).
        The model is put in eval mode and restored to its previous mode.
        """
        device = torch.device(device)
        was_training = model.training
        model.eval()
        amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        loss_sum, count, blocks_run = 0.0, 0, 0
        early_exit = getattr(model, "early_exit", False)
        if flip and early_exit:
            raise UserError("task.eval_flip averages two views of each image, but an early-exit model decides per "
                            "view where each input leaves; evaluate it with task.eval_flip=false.")
        correct = dict.fromkeys(self.topk, 0)
        confidences, top1_ok = [], []
        try:
            for images, targets in batches:
                images, targets = images.to(device), targets.to(device)
                with amp:
                    if early_exit:  # each input leaves at its first confident exit: count the blocks it ran
                        out = model.forward_early_exit(images)
                        logits, blocks_run = out.logits, blocks_run + int(out.exit_block.sum())
                    elif flip:
                        logits = (model(images).float() + model(images.flip(-1)).float()) / 2
                    else:
                        logits = model(images)
                logits = logits.float()
                if logits.shape[-1] != self.num_classes:
                    raise UserError(f"The model gives {logits.shape[-1]} logits per sample but the task has "
                                    f"{self.num_classes} classes; set the model's number of classes to match "
                                    f"the data.")
                loss_sum += float(cross_entropy(logits, targets, reduction="sum"))
                for k, n in topk_correct(logits, targets, self.topk).items():
                    correct[k] += n
                conf, pred = logits.softmax(dim=-1).max(dim=-1)
                confidences.append(conf.cpu())
                top1_ok.append((pred == targets).cpu())
                count += targets.shape[0]
        finally:
            model.train(was_training)
        # in a distributed run each process saw its share of the batches: the sums and the confidences of all
        loss_sum, count, blocks_run, *hits = all_sum([loss_sum, count, blocks_run, *(correct[k] for k in self.topk)])
        count, correct = int(count), {k: int(n) for k, n in zip(self.topk, hits)}
        confidences = [c for share in all_gather(confidences) for c in share]
        top1_ok = [c for share in all_gather(top1_ok) for c in share]
        if count == 0:
            raise UserError("The evaluation set is empty; check the test split of the data source.")
        metrics = {"loss": loss_sum / count}
        metrics.update({f"top{k}": correct[k] / count for k in self.topk})
        confidences, top1_ok = torch.cat(confidences), torch.cat(top1_ok)
        metrics["ece"] = expected_calibration_error(confidences, top1_ok, self.ece_bins)
        metrics["count"] = count
        if early_exit:
            metrics["blocks"] = blocks_run / count  # the mean number of blocks an input ran (its exit's depth)
        if reliability:
            metrics["reliability"] = reliability_bins(confidences, top1_ok, self.ece_bins)
        return metrics
