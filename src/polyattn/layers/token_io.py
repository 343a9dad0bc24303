"""The two ends every language model shares: token embedding in, final norm and vocabulary head out."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import check_tokens
from .norm import RMSNorm


class TokenIO(nn.Module):
    """Embedding `[B, T] → [B, T, D]` and RMSNorm + head `[B, T, D] → [B, T, V]`.

    The head is its own `[V, D]` matrix (LLaMA) or, with `tie_embeddings`, the embedding matrix itself, which
    saves `V·D` parameters (it matters for small models with large vocabularies). Both are initialised
    Normal(0, 0.02).

    Args:
        vocab_size (int): number of token ids `V`.
        dim (int): width `D`.
        tie_embeddings (bool): the head reuses the embedding matrix. Default: False.
        norm_eps (float): epsilon of the final RMSNorm. Default: 1e-6.
        norm_layer (Callable, Optional): builds the final norm from `dim` instead of RMSNorm (e.g. `nn.LayerNorm`).
        head_bias (bool): a bias on the (untied) head. Default: False.
    """

    def __init__(self, vocab_size: int, dim: int, *, tie_embeddings: bool = False, norm_eps: float = 1e-6,
                 norm_layer: Callable[[int], nn.Module] | None = None, head_bias: bool = False):
        super().__init__()
        if tie_embeddings and head_bias:
            raise ValueError("a tied head has no bias; pass head_bias=False with tie_embeddings=True")
        self.vocab_size, self.dim, self.tie_embeddings = vocab_size, dim, tie_embeddings
        self.embed = nn.Embedding(vocab_size, dim)
        self.norm = RMSNorm(dim, eps=norm_eps) if norm_layer is None else norm_layer(dim)
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=head_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, T]` int64 → `[B, T, D]`."""
        check_tokens("embed_tokens", tokens)
        return self.embed(tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, V]`."""
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)
