"""Reversible residual stacks: activation memory that does not grow with depth.

RevNet coupling (Gomez et al., arXiv 1707.04585), as Reversible ViT applies it to pre-norm transformer blocks
(Mangalam et al., arXiv 2302.04869): the stream is kept twice, `(x1, x2) = (x, x)`, and each block with mixer
branch `F` and MLP branch `G` (each branch `DropPath(f(Norm(·)))`, the block's residual branches) maps

    y1 = x1 + F(x2),    y2 = x2 + G(y1)

which is inverted exactly by `x2 = y2 − G(y1)`, `x1 = y1 − F(x2)`. The output of the stack is `(y1 + y2) / 2`
(Reversible ViT's average fuse). Training therefore stores no per-block activations: `ReversibleFunction` keeps
only the last block's `(y1, y2)` (and the random-number state before every branch) and, in backward, walks the
blocks from the last, recomputing each block's input from its output and each branch's graph for its gradient.
Dropout and drop path replay the random state they drew in forward, so the gradients are those of the same
coupled network trained with ordinary backward (`recompute=False`), within round-off.

A block takes part by having `mixer_branch(x, **kwargs) -> (F(x), mixer state)` and `mlp_branch(x, **kwargs)`
(residual-free; the keyword arguments reach both: the mixer's options, or a DiT block's conditioning; a branch that
needs none takes none of them). Decoding token by token (`run_blocks_cached`) runs the same coupling for the new
tokens, each mixer continuing its own cache (its keys, or its state, are those of its input stream `x2`).

As in reentrant activation checkpointing, the parameters' gradients are accumulated into their `.grad` during
the backward pass (`loss.backward()`); `torch.autograd.grad` with respect to parameters does not see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random state a branch draws from (CPU, and the CUDA device's when the stream lives there)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _replayed(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device):
    """A context in which the random state is `state`, restored to what it was afterwards."""
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    class Replay:
        def __enter__(self):
            fork.__enter__()
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)

        def __exit__(self, *exc):
            return fork.__exit__(*exc)

    return Replay()


def _couple(block: nn.Module, x1: torch.Tensor, x2: torch.Tensor, kwargs: dict):
    """One coupled block: `(y1, y2, the mixer's state)`."""
    f, state = block.mixer_branch(x2, **kwargs)
    y1 = x1 + f
    return y1, x2 + block.mlp_branch(y1, **kwargs), state


class ReversibleFunction(torch.autograd.Function):
    """The coupled stack with activations recomputed in backward (see the module docstring).

    Inputs: the two streams `x1, x2 [B, T, D]`, the blocks, the names of the tensor keyword arguments and their
    non-tensor rest, then those tensors (inputs of the function, so their gradients flow, e.g. DiT's `c`).
    """

    @staticmethod
    def forward(ctx, x1, x2, blocks: Sequence[nn.Module], tensor_names: tuple[str, ...], rest: dict, *tensors):
        kwargs = {**rest, **dict(zip(tensor_names, tensors))}
        device = x1.device
        states = []
        with torch.no_grad():
            for block in blocks:
                s_f = _rng_state(device)
                y1 = x1 + block.mixer_branch(x2, **kwargs)[0]
                s_g = _rng_state(device)
                x1, x2 = y1, x2 + block.mlp_branch(y1, **kwargs)
                states.append((s_f, s_g))
        ctx.blocks, ctx.tensor_names, ctx.rest, ctx.states = blocks, tensor_names, rest, states
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(x1, x2, *tensors)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2, *tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        kwargs = {**ctx.rest, **dict(zip(ctx.tensor_names, leaves))}
        device = y1.device
        kind, enabled, dtype = ctx.autocast
        for block, (s_f, s_g) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                y1 = y1.detach().requires_grad_()
                with _replayed(s_g, device):
                    g = block.mlp_branch(y1, **kwargs)
                torch.autograd.backward(g, dy2)  # into y1.grad, the blocks' parameters and the tensor kwargs
                dy1 = dy1 + y1.grad
                x2 = (y2 - g.detach()).detach().requires_grad_()
                with _replayed(s_f, device):
                    f = block.mixer_branch(x2, **kwargs)[0]
                torch.autograd.backward(f, dy1)
            dy2 = dy2 + x2.grad
            y1, y2 = (y1 - f).detach(), x2.detach()
        grads = [t.grad if t.requires_grad else None for t in leaves]
        return (dy1, dy2, None, None, None, *grads)


def reversible_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, *, recompute: bool = True,
                      **kwargs: Any) -> torch.Tensor:
    """`x [B, T, D]` through `blocks` as a reversible stack: `(y1 + y2) / 2` of the coupled streams.

    `recompute=True` (training with gradients) runs `ReversibleFunction`; otherwise, and whenever no gradient is
    needed, the same coupling with ordinary autograd (the reference the tests compare it with). `kwargs` go to
    every branch; tensors among them get their gradients either way.
    """
    tensor_names = tuple(k for k, v in kwargs.items() if torch.is_tensor(v))
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(kwargs[k].requires_grad for k in tensor_names)
                                              or any(p.requires_grad for b in blocks for p in b.parameters()))
    if recompute and needs_grad:
        rest = {k: v for k, v in kwargs.items() if k not in tensor_names}
        if not (x.requires_grad or any(kwargs[k].requires_grad for k in tensor_names)):
            x = x.detach().requires_grad_()  # only the blocks learn: the function's backward must still run
        y1, y2 = ReversibleFunction.apply(x, x, tuple(blocks), tensor_names, rest,
                                          *(kwargs[k] for k in tensor_names))
    else:
        y1, y2 = x, x
        for block in blocks:
            y1, y2, _ = _couple(block, y1, y2, kwargs)
    return (y1 + y2) / 2


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, *, reversible: bool, **kwargs: Any) -> torch.Tensor:
    """A model's block loop: `x, _ = block(x, **kwargs)` for each block, or with `reversible=True` the same blocks
    as a reversible stack (`reversible_blocks`). The one switch a model needs for its `reversible` flag."""
    if reversible:
        return reversible_blocks(blocks, x, **kwargs)
    for block in blocks:
        x, _ = block(x, **kwargs)
    return x


def run_blocks_cached(blocks: Sequence[nn.Module], x: torch.Tensor, layer_kwargs: Sequence[dict], *,
                      reversible: bool) -> tuple[torch.Tensor, list]:
    """A model's cached block loop (prefill or decoding steps): block i gets `layer_kwargs[i]` (its cache, its
    positions) and returns its new cache; with `reversible=True` the blocks are coupled as in `reversible_blocks`,
    so that this equals the full forward. Returns `(x, [new cache of each block])`."""
    states = []
    if not reversible:
        for block, kwargs in zip(blocks, layer_kwargs, strict=True):
            x, state = block(x, **kwargs)
            states.append(state)
        return x, states
    y1 = y2 = x
    for block, kwargs in zip(blocks, layer_kwargs, strict=True):
        y1, y2, state = _couple(block, y1, y2, kwargs)
        states.append(state)
    return (y1 + y2) / 2, states


__all__ = ["ReversibleFunction", "reversible_blocks", "run_blocks", "run_blocks_cached"]
