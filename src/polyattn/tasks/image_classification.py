"""Image classification as a training job: data, augmentation, loss and evaluation for the training loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.loader import BatchLoader, to_device
from ..data.transforms import MixupCutmix, TrainAugment
from ..distributed import shard, world_size
from ..errors import UserError
from ..progress import progress_bar
from .classification import ClassificationTask
from .image_job import ImageJob


class ImageClassificationJob(ImageJob):
    """Supplies batches, the loss and evaluation of an image classifier to `polyattn.train.loop.train`.

    Augmentation (crop, flip, RandAugment, erasing, then mixup or cutmix) runs on whole batches with the job's
    generator (see `ImageJob`). With mixup or cutmix on, the loss is taken against soft targets.
    """

    def __init__(self, config, device: torch.device, splits: tuple[str, ...] = ("train", "test")):
        super().__init__(config, device, splits)
        d = config.data
        if config.task.eval_flip and not d.hflip:
            raise UserError("task.eval_flip evaluates mirror images, but this run trains without them "
                            "(data.hflip is false), so its model has not learnt them; set task.eval_flip=false, "
                            "or train with data.hflip=true.")
        self.eval_flip = config.task.eval_flip
        self.task = ClassificationTask(self.num_classes, label_smoothing=config.task.label_smoothing,
                                       ece_bins=config.task.ece_bins)
        if "train" in splits:
            self.augment = TrainAugment(d.mean, d.std, flip=0.5 if d.hflip else 0.0,
                                        randaugment_ops=d.randaugment_ops,
                                        randaugment_magnitude=d.randaugment_magnitude, erase=d.random_erase,
                                        **self.crop_args(d))
            mix = MixupCutmix(self.num_classes, mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha,
                              prob=d.mix_prob, switch_prob=d.mix_switch_prob)
            self.mix = mix if mix.enabled else None

    def prepare(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented (and mixed) images and their targets on the device; augmentation draws over the whole batch,
        so the draws do not depend on how the loop splits it."""
        images, labels = batch
        x, y = self.augment(images, self.generator), labels
        if self.mix is not None:
            x, y = self.mix(x, y, self.generator)  # y: soft targets (B, classes)
        return to_device(x, y, device=self.device)

    def loss(self, model: nn.Module, batch, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy of a micro-batch and its number of images; for an early-exit model (`early_exit`)
        the deep-supervision loss of all its exits (`ClassificationTask.exits_loss`)."""
        x, y = batch
        if getattr(getattr(model, "module", model), "early_exit", False):  # `module`: under DDP
            return self.task.exits_loss(model(x, all_exits=True, **inputs), y, reduction="sum"), len(y)
        return self.task.loss(model(x, **inputs), y, reduction="sum"), len(y)

    def evaluate(self, model: nn.Module, split: str, *, autocast, reliability: bool = False,
                 progress: bool | None = None) -> dict[str, Any]:
        """Metrics of `ClassificationTask.evaluate` on `split`; `reliability` adds its per-bin calibration
        ("reliability": `ReliabilityBins`), `progress` shows a progress bar over the batches (None: as
        train.progress says)."""
        loader = BatchLoader(self.eval_dataset(split), self.eval_batch_size, shuffle=False)
        batches = ((self.eval_transform(x), y) for x, y in shard(loader.epoch(0)))  # this process's share
        if progress if progress is not None else self.progress:
            batches = progress_bar(batches, total=-(-len(loader) // world_size()), desc=f"evaluating {split}",
                                   unit="batch")
        with autocast():
            return self.task.evaluate(model, batches, device=self.device, reliability=reliability,
                                      flip=self.eval_flip)
