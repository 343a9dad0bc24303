"""Cross-attention between two sequences: queries from one, keys and values from another, with padding.

`polyattn.layers.Attention` is self-attention when `context` is None and cross-attention otherwise; the context
may have its own width (`context_dim`) and a `key_padding_mask` (True = a real token). The toy task: a set of
`n` vectors (the context) and queries that each carry an index; each query must return the vector at its index,
which it can only do by attending to the right context token.

    python examples/cross_attention.py [--steps 200]
"""

import argparse

import torch
from torch import nn

from polyattn.layers import Attention, RMSNorm


class Retriever(nn.Module):
    def __init__(self, n: int = 8, dim: int = 32, context_dim: int = 16, num_heads: int = 2):
        super().__init__()
        self.slot = nn.Embedding(n, context_dim)  # marks each context token's position in the set
        self.query = nn.Embedding(n, dim)  # a query per index it asks for
        self.cross = Attention(dim, num_heads, context_dim=context_dim)
        self.norm = RMSNorm(dim)
        self.out = nn.Linear(dim, context_dim)

    def forward(self, context: torch.Tensor, indices: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """context `[B, S, C]`, indices `[B, T]` into it, padding `[B, S]` (True = real) → `[B, T, C]`."""
        keys = context + self.slot.weight[: context.shape[1]]
        o, _ = self.cross(self.query(indices), context=keys, key_padding_mask=padding)
        return self.out(self.norm(o))


def batch(b: int, n: int, c: int, generator: torch.Generator):
    lengths = torch.randint(n // 2, n + 1, (b,), generator=generator)
    padding = torch.arange(n)[None] < lengths[:, None]  # every set has its own length
    context = torch.randn(b, n, c, generator=generator) * padding[..., None]
    indices = (torch.rand(b, 4, generator=generator) * lengths[:, None]).long()  # only real tokens are asked for
    target = torch.gather(context, 1, indices[..., None].expand(-1, -1, c))
    return context, indices, padding, target


def main(steps: int = 200) -> float:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Retriever()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(steps):
        context, indices, padding, target = batch(64, 8, 16, g)
        loss = nn.functional.mse_loss(model(context, indices, padding), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    # padded context tokens are never read: changing them changes nothing
    context, indices, padding, _ = batch(4, 8, 16, g)
    noisy = context + torch.randn_like(context) * (~padding)[..., None]
    with torch.no_grad():
        assert torch.allclose(model(context, indices, padding), model(noisy, indices, padding), atol=1e-5)
    print(f"retrieval loss {first:.3f} → {loss.item():.3f} after {steps} steps (0 = exact retrieval, 1 = none)")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.steps)
