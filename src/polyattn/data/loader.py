"""Batches of an in-memory image dataset, in an order that is a pure function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import UserError
from .images import ImageDataset


def to_device(*tensors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host batches on `device`: on CUDA copied from pinned memory without blocking, so the copy overlaps the
    previous step's kernels (a non_blocking copy from pageable memory is synchronous); elsewhere a plain copy."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


class BatchLoader:
    """Yields (images uint8 [B,C,H,W], labels [B]) batches of an in-memory dataset.

    With `shuffle`, epoch `e` visits the samples in the order
    `torch.randperm(N, generator=torch.Generator().manual_seed(seed * 100003 + e))`, so a run resumed at
    (epoch, batch) with `epoch(epoch, start_batch=batch)` sees exactly the batches it would have seen.
    Without `shuffle` the order is the dataset's. With `drop_last` a final partial batch is left out.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"The batch size must be a positive integer, got {batch_size!r}.")
        n = len(dataset.labels)
        if drop_last and n < batch_size:
            raise UserError(f"The batch size {batch_size} is larger than the {n} samples of the dataset, so "
                            f"dropping the last partial batch leaves no batches; use a smaller batch size.")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last

    def __len__(self) -> int:
        n = len(self.dataset.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample indices of `epoch`, in visiting order."""
        n = len(self.dataset.labels)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from batch `start_batch` on (0-based)."""
        if not 0 <= start_batch <= len(self):
            raise UserError(f"Cannot resume at batch {start_batch} of an epoch that has {len(self)} batches; "
                            f"check that the checkpoint matches this dataset and batch size.")
        return self._batches(self.order(epoch), start_batch)  # checked now, not at the first next()

    def _batches(self, order: torch.Tensor, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.dataset.images, self.dataset.labels
        for i in range(start_batch, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield images[idx], labels[idx]
