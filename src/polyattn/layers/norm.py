"""Normalisation layers."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv 1910.07467): `y = x · rsqrt(mean(x², -1) + eps) · w`.

    Computed in float32 and cast back, so bfloat16 activations do not lose the small squares.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape) if self.weight is not None else 'no affine'}, eps={self.eps}"


class GroupRMSNorm(nn.Module):
    """RMSNorm applied independently to each of `groups` equal slices of the last dimension (one per head)."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-6):
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().unflatten(-1, (self.groups, -1))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (y * self.weight.float()).to(x.dtype)
