"""The data plumbing every image task shares: splits held in memory, normalisation, batches and the job's
augmentation generator (for `polyattn.train.loop.train`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.images import ImageDataset, load_image_split, stratified_split
from ..data.loader import BatchLoader
from ..data.transforms import EvalTransform, channel_stats
from ..errors import UserError
from ..settings import Section, checked

VAL_SEED = 1  # the validation hold-out is fixed, independent of the training seed
EVAL_SUBSET_SEED = 1234  # the evaluation subsets (task.eval_images) are fixed: the same images in every run

Stats = tuple[Sequence[float], Sequence[float]]


@dataclass
class ImageTaskConfig(Section):
    """The keys that the `task` sections of every image task share."""

    eval_images: int | None = checked(None, ge=1)
    """Image tasks: evaluate on at most this many images of the split, a fixed random subset (the same images in
    every evaluation and every run; classification's `count` metric says how many); null = all. For models whose
    evaluation of a whole split would take longer than their training (e.g. at 1,024 tokens per image on a CPU)."""


class ImageJob:
    """Loads the splits of `data.source`, fixes the normalisation and batches the training split.

    Datasets live in memory as uint8 tensors. `data.val_fraction > 0` holds out a fixed stratified share of the
    training split as `val`, which is then the split evaluated during training (else `test`). The normalisation
    (`data.mean`, `data.std`) is written back into the config, so the run directory evaluates identically without
    reloading the training split; `default_stats(channels)` chooses it when the config has none (default: the
    training split's channel statistics). `task.eval_images` limits every evaluation to a fixed subset of the
    split (`eval_dataset`), for models whose evaluation of a whole split would cost more than their training.
    Augmentation draws come from the job's generator, whose state goes into checkpoints, so a resumed run draws
    what the uninterrupted one would have. Subclasses add the loss and the evaluation.
    """

    def __init__(self, config, device: torch.device, splits: tuple[str, ...],
                 default_stats: Callable[[int], Stats] | None = None):
        d, t = config.data, config.train
        self.device = device
        self.datasets: dict[str, ImageDataset] = {}
        needs_stats = d.mean is None and default_stats is None
        if "train" in splits or "val" in splits or needs_stats:
            train = load_image_split(d.source, "train", image_size=d.image_size, test_fraction=d.test_fraction,
                                     progress=t.progress)
            if d.val_fraction > 0:
                train_idx, val_idx = stratified_split(train.labels, d.val_fraction, seed=VAL_SEED)
                self.datasets["val"] = subset(train, val_idx)
                train = subset(train, train_idx)
            self.datasets["train"] = train
        if "test" in splits:
            self.datasets["test"] = load_image_split(d.source, "test", image_size=d.image_size,
                                                     test_fraction=d.test_fraction, progress=t.progress)
        for split in splits:
            if split not in self.datasets:
                raise UserError(f"Split '{split}' is not available; use 'train', 'test', or 'val' with "
                                f"data.val_fraction > 0.")
        reference = next(iter(self.datasets.values()))
        _, channels, height, width = reference.images.shape
        if d.mean is None or d.std is None:
            d.mean, d.std = default_stats(channels) if default_stats else channel_stats(self.datasets["train"])
        if len(d.mean) != channels or len(d.std) != channels:
            raise UserError(f"data.mean and data.std need one value per image channel ({channels} here), got "
                            f"{list(d.mean)} and {list(d.std)}.")
        self.classes = list(reference.classes)
        self.num_classes = len(self.classes)
        self.inferred_model_args = {"num_classes": self.num_classes, "in_chans": channels,
                                    "img_size": height if height == width else (height, width)}
        self.eval_batch_size = d.eval_batch_size
        self.eval_images = config.task.eval_images
        if self.eval_images is not None and self.eval_images < 1:
            raise UserError(f"task.eval_images must be a positive number of images or null, got {self.eval_images}.")
        self.progress = t.progress
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

    def describe_data(self) -> str:
        """One line for the header of a command: the source, its splits' sizes, classes and image shape."""
        sizes = " / ".join(f"{len(v):,} {k}" for k, v in self.datasets.items())
        first = next(iter(self.datasets.values()))
        _, c, h, w = first.images.shape
        return f"{first.source} ({sizes} images, {self.num_classes} classes, {c}×{h}×{w})"

    @staticmethod
    def crop_args(data_config) -> dict[str, Any]:
        """`TrainAugment`'s crop arguments for `data.crop`."""
        d = data_config
        if d.crop == "pad":
            return dict(pad=d.crop_padding)
        return dict(scale=tuple(d.crop_scale)) if d.crop == "resized" else {}

    def eval_dataset(self, split: str, generator: torch.Generator | None = None) -> ImageDataset:
        """The split to evaluate: all of it, or `task.eval_images` of its images, a random subset fixed by `generator`
        (default: seeded with `EVAL_SUBSET_SEED`), so that every evaluation of every run sees the same images."""
        dataset = self.datasets[split]
        if self.eval_images is None or self.eval_images >= len(dataset):
            return dataset
        generator = torch.Generator().manual_seed(EVAL_SUBSET_SEED) if generator is None else generator
        return subset(dataset, torch.randperm(len(dataset), generator=generator)[:self.eval_images])

    def batches(self, epoch: int, start_step: int):
        return self.loader.epoch(epoch, start_step)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def subset(dataset: ImageDataset, index: torch.Tensor) -> ImageDataset:
    return ImageDataset(dataset.images[index], dataset.labels[index], dataset.classes, dataset.source)
