"""Image classification as a training job: data, augmentation, loss and evaluation for the training loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.images import ImageDataset, load_image_split, stratified_split
from ..data.loader import BatchLoader
from ..data.transforms import EvalTransform, MixupCutmix, TrainAugment, channel_stats
from ..errors import UserError
from .classification import ClassificationTask

VAL_SEED = 1  # the validation hold-out is fixed, independent of the training seed


class ImageClassificationJob:
    """Supplies batches, the loss and evaluation of an image classifier to `polyattn.train.loop.train`.

    Datasets live in memory as uint8 tensors; augmentation (crop, flip, RandAugment, erasing, then mixup or
    cutmix) runs on whole batches with the job's own generator, whose state goes into checkpoints so a resumed
    run draws the same augmentation. With mixup or cutmix on, the loss is taken against soft targets.
    """

    def __init__(self, config, device: torch.device, splits: tuple[str, ...] = ("train", "test")):
        d, t = config.data, config.train
        self.device = device
        self.datasets: dict[str, ImageDataset] = {}
        if "train" in splits or "val" in splits or d.mean is None:
            train = load_image_split(d.source, "train", image_size=d.image_size, test_fraction=d.test_fraction)
            if d.val_fraction > 0:
                train_idx, val_idx = stratified_split(train.labels, d.val_fraction, seed=VAL_SEED)
                self.datasets["val"] = _subset(train, val_idx)
                train = _subset(train, train_idx)
            self.datasets["train"] = train
        if "test" in splits:
            self.datasets["test"] = load_image_split(d.source, "test", image_size=d.image_size,
                                                     test_fraction=d.test_fraction)
        for split in splits:
            if split not in self.datasets:
                raise UserError(f"Split '{split}' is not available; use 'train', 'test', or 'val' with "
                                f"data.val_fraction > 0.")
        if d.mean is None or d.std is None:
            # Stored in the run's config so evaluation normalises identically without reloading the train split.
            d.mean, d.std = channel_stats(self.datasets["train"])
        reference = next(iter(self.datasets.values()))
        _, channels, height, width = reference.images.shape
        self.num_classes = len(reference.classes)
        self.inferred_model_args = {"num_classes": self.num_classes, "in_chans": channels,
                                    "img_size": height if height == width else (height, width)}
        self.task = ClassificationTask(self.num_classes, label_smoothing=config.task.label_smoothing,
                                       ece_bins=config.task.ece_bins)
        self.eval_batch_size = d.eval_batch_size
        self.eval_transform = EvalTransform(d.mean, d.std)
        self.eval_split = "val" if "val" in self.datasets else "test"
        self.generator = torch.Generator().manual_seed(t.seed)
        if "train" in splits:
            train = self.datasets["train"]
            if len(train) < t.batch_size:
                raise UserError(f"The training split has {len(train)} images, fewer than train.batch_size "
                                f"{t.batch_size}; lower the batch size.")
            self.loader = BatchLoader(train, t.batch_size, shuffle=True, seed=t.seed, drop_last=True)
            self.steps_per_epoch = len(self.loader)
            self.samples_per_step = t.batch_size
            crop = dict(pad=d.crop_padding) if d.crop == "pad" else \
                dict(scale=tuple(d.crop_scale)) if d.crop == "resized" else {}
            self.augment = TrainAugment(d.mean, d.std, flip=0.5 if d.hflip else 0.0,
                                        randaugment_ops=d.randaugment_ops,
                                        randaugment_magnitude=d.randaugment_magnitude, erase=d.random_erase,
                                        **crop)
            mix = MixupCutmix(self.num_classes, mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha,
                              prob=d.mix_prob, switch_prob=d.mix_switch_prob)
            self.mix = mix if mix.enabled else None

    def batches(self, epoch: int, start_step: int):
        return self.loader.epoch(epoch, start_step)

    def loss(self, model: nn.Module, batch, *, accumulation_steps: int, autocast,
             forward_kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        images, labels = batch
        x, y = self.augment(images, self.generator), labels
        if self.mix is not None:
            x, y = self.mix(x, y, self.generator)  # y: soft targets (B, classes)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        total = torch.zeros((), device=self.device)
        for xs, ys in zip(x.chunk(accumulation_steps), y.chunk(accumulation_steps)):
            with autocast():
                logits = model(xs, **forward_kwargs)
            # Weight each micro-batch by its share, so accumulation gives the same gradient as one big batch.
            loss = self.task.loss(logits.float(), ys) * (len(ys) / len(y))
            loss.backward()
            total += loss.detach()
        return total, len(y)

    def evaluate(self, model: nn.Module, split: str, *, autocast, reliability: bool = False,
                 progress: bool = False) -> dict[str, Any]:
        """Metrics of `ClassificationTask.evaluate` on `split`; `reliability` adds its per-bin calibration
        ("reliability": `ReliabilityBins`), `progress` shows a progress bar over the batches."""
        loader = BatchLoader(self.datasets[split], self.eval_batch_size, shuffle=False)
        batches = ((self.eval_transform(x), y) for x, y in loader.epoch(0))
        if progress:
            import sys

            from tqdm import tqdm

            batches = tqdm(batches, total=len(loader), desc=f"evaluating {split}", unit="batch", file=sys.stderr,
                           dynamic_ncols=True)
        with autocast():
            return self.task.evaluate(model, batches, device=self.device, reliability=reliability)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _subset(dataset: ImageDataset, index: torch.Tensor) -> ImageDataset:
    return ImageDataset(dataset.images[index], dataset.labels[index], dataset.classes, dataset.source)
