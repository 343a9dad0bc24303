"""Mixture-of-Depths: a per-token choice of which tokens a block computes (Raposo et al., arXiv 2404.02258).

A routed block has a router, one linear map to a scalar weight per token, `r = wᵀx`. In training (§3.1-3.4) the
block computes the `k = round(c·T)` tokens with the largest weights of each sequence (capacity `c`, e.g. 12.5%)
and every other token goes round it on the residual stream unchanged:

    x_out = x + r · f(x̃)    for the top-k tokens,        x_out = x    for the others,

where `x̃` are the chosen tokens (in sequence order; they attend only to each other, causally, at their own
positions) and `f` the block's residual branches (attention + MLP). The router weight multiplies the block's
output, which puts the router on the gradient path (the paper's "router weight multiplies the block output").

Top-k over the sequence is not causal: whether token t is chosen depends on the weights of later tokens. For
autoregressive sampling the paper offers two fixes (§3.5); this module implements the second, the *auxiliary
predictor*: a small MLP (D → D/4 → 1, SiLU) reads the same input as the router, through a stop-gradient, and is
trained with binary cross-entropy to predict whether each token is among the top-k (the targets are the top-k
membership of the same forward pass). It does not touch the language-modelling gradient, so the routed network
trains exactly as with top-k. At inference (`causal=True`) a token is computed iff its predictor logit exceeds
the block's `threshold`: a per-token, causal decision, so the number of tokens a block computes varies by row
and by step, and the block's KV cache holds keys of the tokens it computed only (the slots of the others are
masked). The first fix (an auxiliary BCE loss on the router's own outputs, thresholded at 0.5) is not built.

The threshold is calibrated, not the paper's fixed 0.5 probability (logit 0): every training forward measures the
logit above which the capacity's share of its tokens lies (the `(1 − c)` quantile over the batch) and the
buffer keeps a running mean of it (the plain mean over the first 100 steps, then an exponential one with weight
0.01, as the predictor still moves). A predictor that has learnt the top-k well puts that quantile near 0, so
both rules agree; a short run's predictor, trained on 12.5% positives, stays below 0.5 for almost every token,
and the literal rule then skipped the routed blocks (0.1% of the tokens chosen at capacity 0.125, 100 steps of
`llama_mod_shakespeare`), while the calibrated one computes about the capacity's share. A model saved before the
buffer existed loads with threshold 0, the paper's rule.

A block takes part by having `mixer_branch(x, **kwargs) -> (attention branch, cache)` and `mlp_branch(x)`
(`TransformerBlock` has both) and a self-attention whose RoPE angles are passed in (`rope=`): the router hands the
block the angles of the chosen tokens' own positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .attention import KVCache
from .rope import Rotary

RopeAt = Callable[[torch.Tensor], Rotary]
"""`rope_at(positions [T] or [B, T]) -> Rotary`: the model's RoPE angles at token positions."""


@dataclass
class Routing:
    """What one routed block did in a forward pass."""

    selected: torch.Tensor
    """`[B, T]` bool: the tokens the block computed."""
    predictor_loss: torch.Tensor | None
    """Training (top-k) mode: the predictor's binary cross-entropy against the top-k choice, summed over the
    tokens (float32 scalar); None in the causal mode."""


def check_capacity(capacity: float) -> float:
    """The capacity as a float; outside (0, 1] it is an error."""
    capacity = float(capacity)
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"mod_capacity is the share of a sequence's tokens a routed block computes, in (0, 1] "
                         f"(the paper: 0.125), got {capacity}")
    return capacity


class MixtureOfDepths(nn.Module):
    """The router and predictor around one block (module docstring); the block itself stays the model's.

    Args:
        dim (int): width `D`.
        capacity (float): share `c` of each training sequence's tokens the block computes, in (0, 1].
    """

    def __init__(self, dim: int, capacity: float):
        super().__init__()
        self.capacity = check_capacity(capacity)
        self.router = nn.Linear(dim, 1, bias=False)
        self.predictor = nn.Sequential(nn.Linear(dim, max(dim // 4, 1)), nn.SiLU(), nn.Linear(max(dim // 4, 1), 1))
        # the inference rule's logit threshold and how many training forwards have measured it (module docstring)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("threshold", "threshold_updates"):  # saved before the threshold was calibrated: logit 0
            state_dict.setdefault(prefix + name, torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _calibrate(self, logits: torch.Tensor, chosen: int) -> None:
        """Moves `threshold` towards the logit above which `chosen` of the batch's `logits.numel()` tokens lie."""
        flat = logits.detach().float().flatten()
        if chosen >= flat.numel():
            return  # every token is chosen: no logit separates them (capacity 1)
        # between the chosen-th and (chosen+1)-th largest, so that `logit > threshold` picks `chosen` of them
        top = flat.topk(chosen + 1).values
        measured = (top[-2] + top[-1]) / 2
        self.threshold_updates += 1
        weight = torch.clamp(1.0 / self.threshold_updates, min=0.01)
        self.threshold += weight * (measured - self.threshold)

    def tokens_for(self, seq_len: int) -> int:
        """`k`: how many of `seq_len` tokens the block computes in training (at least one)."""
        return max(1, min(seq_len, round(self.capacity * seq_len)))

    def forward(self, block: nn.Module, x: torch.Tensor, positions: torch.Tensor, rope_at: RopeAt, *,
                causal: bool, cache: KVCache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, KVCache | None, Routing]:
        """`x [B, T, D]` at `positions [T]` through `block` for the chosen tokens: `(x_out, cache, Routing)`.

        `causal=False`: the top-k of each sequence (training; no cache). `causal=True`: the predictor's per-token
        choice, continuing `cache` (the block's, from an earlier call) when given.
        """
        if not causal:
            if cache is not None or use_cache:
                raise ValueError("top-k routing reads the whole sequence and cannot decode with a cache; decode "
                                 "with causal=True (the predictor's per-token choice)")
            return self._top_k(block, x, positions, rope_at)
        return self._predicted(block, x, positions, rope_at, cache, use_cache)

    def _residual(self, block: nn.Module, xs: torch.Tensor, **kwargs) -> tuple[torch.Tensor, KVCache | None]:
        """`f(x̃)`, the block's two residual branches on the chosen tokens, and the attention's cache."""
        a, cache = block.mixer_branch(xs, **kwargs)
        return a + block.mlp_branch(xs + a), cache

    def _top_k(self, block, x, positions, rope_at):
        B, T, D = x.shape
        r = self.router(x).squeeze(-1)  # (B, T)
        idx = r.topk(self.tokens_for(T), dim=1).indices.sort(dim=1).values  # (B, k), in sequence order
        selected = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        gather = idx[..., None].expand(-1, -1, D)
        xs = x.gather(1, gather)  # (B, k, D); the causal mask over their order is causal over their positions
        f, _ = self._residual(block, xs, rope=rope_at(positions[idx]))
        out = x.scatter_add(1, gather, (r.gather(1, idx)[..., None] * f).to(x.dtype))  # autocast: f may be bf16
        pred = self.predictor(x.detach()).squeeze(-1).float()  # stop-gradient: the LM loss does not see it
        bce = F.binary_cross_entropy_with_logits(pred, selected.float(), reduction="sum")
        if self.training:
            self._calibrate(pred, B * idx.shape[1])
        return out, None, Routing(selected, bce)

    def _predicted(self, block, x, positions, rope_at, cache, use_cache):
        B, _, D = x.shape
        selected = self.predictor(x).squeeze(-1) > self.threshold  # (B, T): causal, one token at a time
        counts = selected.sum(1)
        kmax = int(counts.max()) if B else 0
        rows = (counts > 0).nonzero().squeeze(1)  # only the rows with a chosen token run the block at all
        slots = torch.arange(kmax, device=x.device)
        valid = slots < counts[:, None]  # (B, kmax): real slots first, then padding
        new_cache = None
        if kmax == 0:
            out = x
        else:
            # the chosen tokens of each row first, in sequence order (a stable sort of "not chosen")
            idx = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :kmax]  # (B, kmax)
            sub_idx, sub_valid = idx[rows], valid[rows]
            gather = sub_idx[..., None].expand(-1, -1, D)
            xs = x[rows].gather(1, gather)  # (b, kmax, D); padding slots (at the end) are never attended to
            sub_cache = None
            if cache is not None:
                sub_cache = KVCache(cache.k[rows], cache.v[rows], _mask(cache)[rows], cache.offset)
            f, sub_new = self._residual(block, xs, rope=rope_at(positions[sub_idx]), key_padding_mask=sub_valid,
                                        cache=sub_cache, use_cache=use_cache or cache is not None)
            r = self.router(xs).squeeze(-1)  # (b, kmax)
            update = torch.where(sub_valid[..., None], r[..., None] * f, torch.zeros_like(f)).to(x.dtype)
            out = x.clone()
            out[rows] = x[rows].scatter_add(1, gather, update)
            if sub_new is not None:
                new_cache = _scatter_rows(cache, sub_new, rows, valid, B)
        if new_cache is None and (use_cache or cache is not None):
            new_cache = _scatter_rows(cache, None, rows, valid, B, like=x, block=block)
        return out, new_cache, Routing(selected, None)


def _mask(cache: KVCache) -> torch.Tensor:
    """The cache's key padding mask, all real when it has none."""
    if cache.key_padding_mask is not None:
        return cache.key_padding_mask
    return torch.ones(cache.k.shape[:2], dtype=torch.bool, device=cache.k.device)


def _scatter_rows(old: KVCache | None, sub: KVCache | None, rows: torch.Tensor, valid: torch.Tensor, B: int, *,
                  like: torch.Tensor | None = None, block: nn.Module | None = None) -> KVCache:
    """The whole batch's cache after a call in which only `rows` ran the block (their new cache `sub`): every row
    gains `valid.shape[1]` slots, real where `valid` says, so that the rows stay one rectangular tensor."""
    if old is None:
        if sub is None:  # no row chose a token and there is no cache yet: an empty one of the block's shape
            attn = block.attn
            return KVCache.empty(B, attn.num_kv_heads, attn.head_dim, device=like.device, dtype=like.dtype)
        old = KVCache.empty(B, sub.k.shape[2], sub.k.shape[3], sub.v.shape[3], device=sub.k.device,
                            dtype=sub.k.dtype)
    n_new = valid.shape[1]
    k = torch.cat((old.k, old.k.new_zeros(B, n_new, *old.k.shape[2:])), dim=1)
    v = torch.cat((old.v, old.v.new_zeros(B, n_new, *old.v.shape[2:])), dim=1)
    if sub is not None:
        k[rows], v[rows] = sub.k.to(k.dtype), sub.v.to(v.dtype)
    return KVCache(k, v, torch.cat((_mask(old), valid), dim=1), old.offset + n_new)


__all__ = ["MixtureOfDepths", "Routing", "check_capacity"]
