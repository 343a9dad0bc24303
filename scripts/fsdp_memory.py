"""Per-process memory of a 19M-parameter ViT under DDP and FSDP (the README's FSDP table, second row): the bytes of
the tensors each process holds for weights, gradients and AdamW moments after 5 steps, and its resident set once
freed memory is returned to the OS (glibc `malloc_trim`), and its peak (VmHWM).

    OMP_NUM_THREADS=1 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 scripts/fsdp_memory.py ddp
    OMP_NUM_THREADS=1 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 scripts/fsdp_memory.py fsdp
"""

import ctypes
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from polyattn import create_model
from polyattn.train import build_optimizer, shard_model
from polyattn.train.sharding import local


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = create_model("vit_nano", embed_dim=512, depth=6, num_heads=8, img_size=16, patch_size=4,
                         num_classes=10, in_chans=1)
    train_model = model
    if mode == "fsdp":
        shard_model(model, torch.device("cpu"), bf16=False)
    else:
        train_model = DistributedDataParallel(model)
    optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.999))
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    for _ in range(5):
        torch.nn.functional.cross_entropy(train_model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def mib(tensors) -> float:
        return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**20

    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":", 1) for line in lines if line.startswith("Vm"))
    print(f"{mode} rank {dist.get_rank()}: weights {mib(model.parameters()):.1f} MiB, gradients "
          f"{mib(p.grad for p in model.parameters()):.1f} MiB, AdamW moments {mib(moments):.1f} MiB, "
          f"VmRSS {status['VmRSS'].strip()}, VmHWM {status['VmHWM'].strip()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
