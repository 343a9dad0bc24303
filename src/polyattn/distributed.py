"""The process group a run may be part of, usable from every layer (like `hardware`): which process this is, and
the few collectives the loop and the evaluations need. Without `torch.distributed` initialised (one process)
every function is the identity, so single-process code paths are unchanged.

Runs are launched by `torchrun` (or `polyattn train --nproc N`, which runs it): its environment (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, ...) makes `init_process_group` join the group, with gloo on CPUs
and nccl on CUDA GPUs, and a timeout on every collective so that a process whose peer died stops with one
sentence instead of waiting forever.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

COLLECTIVE_TIMEOUT_S = 60.0
"""Default seconds a collective waits for the other processes before this one gives up (`train.collective_timeout_s`):
above the longest step between two collectives of a run on a CPU (an evaluation pass, a checkpoint write)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is part of an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's index in the group (0 alone)."""
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the group (1 alone)."""
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files, logs and progress (rank 0)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's `LOCAL_RANK`), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Joins the process group torchrun describes: nccl on CUDA, gloo elsewhere; every collective times out after
    `timeout_s`. Does nothing when not launched, or when already joined."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def shard(items: Iterable[Any]) -> Iterator[Any]:
    """This process's share of `items`: the i-th item goes to process `i mod world_size`, so the shares are
    disjoint and together are all of `items`."""
    r, w = rank(), world_size()
    for i, item in enumerate(items):
        if i % w == r:
            yield item


def all_sum(values: list[float], device: Any = "cpu") -> list[float]:
    """The sums of `values` over every process (float64 on `device`); `values` itself alone."""
    if not active():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (`[obj]` alone)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Leaves the process group (at the end of a run, so the next one in this process can join anew)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["COLLECTIVE_TIMEOUT_S", "active", "all_gather", "all_sum", "barrier", "broadcast", "init", "is_main",
           "launched", "local_rank", "rank", "shard", "shutdown", "world_size"]
