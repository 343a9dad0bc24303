"""How the loop lays a model out in memory: activation checkpointing and FSDP2 sharding of its repeated blocks.

Both act on the same units, a model's repeated blocks (`repeated_blocks`, the one place that finds them), and
compose as PyTorch's own recipes do: the checkpointed forward inside, `fully_shard` outside, so a block's
parameters are gathered by FSDP before its forward and again before its recomputation in backward.

FSDP (`train.fsdp`, several processes): each block, then the whole model, is wrapped with
`torch.distributed.fsdp.fully_shard` on a 1-D device mesh of every process. Each process keeps 1/N of every
parameter, gradient and AdamW moment; a block's full parameters exist only while it runs (gathered before its
forward and its backward, freed after). The gradients are reduce-scattered (averaged over processes, as DDP does),
so the loop's step is the same as under DDP. Under bfloat16 autocast the gathered parameters are bfloat16 and the
gradients are reduced in float32 (`MixedPrecisionPolicy`); in float32 nothing is cast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model` that it runs by calling them (their `forward`): the units of activation
    checkpointing and FSDP.

    A model may say which they are with a `forward_blocks()` method, and a block may name the methods besides
    `forward` through which its model calls it (`entry_methods`, e.g. DiT's conditioning encoder). Otherwise they
    are the members of its outermost nn.ModuleLists, except in a reversible stack (`model.reversible`,
    `polyattn.layers.reversible`), whose blocks are entered through their branches and already recompute their
    activations: there are none.
    """
    own = getattr(model, "forward_blocks", None)
    if own is not None:
        return list(own())
    if getattr(model, "reversible", False):
        return []
    return _module_list_members(model)


def _module_list_members(module: nn.Module) -> list[nn.Module]:
    blocks = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        else:
            blocks.extend(_module_list_members(child))
    return blocks


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing (`train.activation_checkpointing`): each repeated block of `model` keeps only its
    inputs during the forward pass and recomputes its activations in the backward pass (`torch.utils.checkpoint`,
    non-reentrant, with the random state of the first pass, so dropout draws the same), trading about one more
    forward for the memory of every block's activations. Weights and results are unchanged. Returns the number of
    blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def shard_model(model: nn.Module, device: torch.device, *, bf16: bool) -> int:
    """Shards `model` in place over every process (FSDP2, see the module docstring): each repeated block, then the
    root (which holds the rest: embeddings, head, final norm). `bf16`: the run autocasts to bfloat16, so the
    gathered parameters are bfloat16 and gradients are reduced in float32. Returns the number of blocks sharded.

    Call it after activation checkpointing (`checkpoint_blocks`) and before the optimizer is built, since the
    parameters become DTensors (each process's shard of the full tensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from .. import distributed

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        for name in getattr(block, "entry_methods", ()):  # a block's other entries gather its parameters too
            register_fsdp_forward_method(block, name)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(blocks)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_fsdp(*, ema: bool, precision: str) -> None:
    """What `train.fsdp` cannot be combined with, as one sentence."""
    if ema:
        raise UserError("train.fsdp does not keep an averaged copy of the weights (train.ema_decay), which would "
                        "need the full weights on every process; turn train.ema_decay off, or train with "
                        "train.fsdp=false (DDP).")
    if precision == "fp16":
        raise UserError("train.fsdp trains in bf16 or fp32, not fp16 (its gradient scaler does not handle sharded "
                        "gradients); set train.precision=bf16 or fp32, or train.fsdp=false.")


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside: every process holds the full parameters of a sharded `model`, so its forward runs no collective
    and processes may run different numbers of forwards (a sharded evaluation, a sample drawn by one process).
    Costs the memory of the full parameters; does nothing for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on CPU, as plain tensors: gathered on rank 0 (every process must call it; the
    others get an empty dict) for a sharded model, the state dict itself otherwise."""
    if not is_sharded(model):
        return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t`: the local shard of a DTensor, `t` itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t`: a DTensor's full value (a collective for a sharded one), `t` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads a one-process optimizer state dict (`optimizer.state_dict()`, parameters numbered in the optimizer's
    order) into the optimizer of the sharded `model`, each process taking its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


__all__ = ["check_fsdp", "checkpoint_blocks", "full_state_dict", "gathered", "repeated_blocks", "shard_model"]
