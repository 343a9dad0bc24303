"""An int8 KV cache for softmax decoding: keys and values stored in 8 bits with one scale per token and head.

`Int8KVCache` stands in for `KVCache` (`polyattn.layers.attention`): `Attention` calls `append` with the new
keys and values, which are quantized on the way in, and reads `k` and `v`, which are dequantized on the way out
(to the dtype they came in). Between steps the cache holds `Hkv·(D + Dv)` bytes plus two float32 scales per token
and head instead of `4·Hkv·(D + Dv)` bytes in float32; each step dequantizes the whole cache once per layer, so it
trades memory for that work. Symmetric absmax scales per (token, head) keep one outlier token from coarsening the
others (KIVI, arXiv 2402.02750, quantizes keys per channel; per token is the simpler form that appends without
re-quantizing old entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import KVCache


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [B, S, H, D]` → int8 values and float32 scales `[B, S, H, 1]` with `x ≈ q · scale`."""
    scale = (x.detach().float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


@dataclass
class Int8KVCache:
    """A `KVCache` stored in int8 (module docstring); `k` and `v` read it back in `dtype`."""

    k_int8: torch.Tensor
    k_scale: torch.Tensor
    v_int8: torch.Tensor
    v_scale: torch.Tensor
    key_padding_mask: torch.Tensor | None
    offset: int
    dtype: torch.dtype

    @classmethod
    def from_cache(cls, cache: KVCache) -> Int8KVCache:
        (kq, ks), (vq, vs) = quantize_per_head(cache.k), quantize_per_head(cache.v)
        return cls(kq, ks, vq, vs, cache.key_padding_mask, cache.offset, cache.k.dtype)

    @property
    def k(self) -> torch.Tensor:
        return (self.k_int8.float() * self.k_scale).to(self.dtype)

    @property
    def v(self) -> torch.Tensor:
        return (self.v_int8.float() * self.v_scale).to(self.dtype)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor,
               key_padding_mask_new: torch.Tensor | None = None) -> Int8KVCache:
        """A new cache with `k_new`, `v_new` `[B, T, Hkv, D]` quantized and appended (as `KVCache.append`)."""
        mask = self.key_padding_mask
        if mask is not None or key_padding_mask_new is not None:
            old = mask if mask is not None else torch.ones(self.k_int8.shape[:2], dtype=torch.bool,
                                                           device=self.k_int8.device)
            new = (key_padding_mask_new.bool() if key_padding_mask_new is not None
                   else torch.ones(k_new.shape[:2], dtype=torch.bool, device=k_new.device))
            mask = torch.cat((old, new), dim=1)
        (kq, ks), (vq, vs) = quantize_per_head(k_new), quantize_per_head(v_new)
        cat = lambda a, b: torch.cat((a, b), dim=1)
        return Int8KVCache(cat(self.k_int8, kq), cat(self.k_scale, ks), cat(self.v_int8, vq), cat(self.v_scale, vs),
                           mask, self.offset + k_new.shape[1], self.dtype)

    def next_positions(self, num_new: int = 1) -> torch.Tensor:
        steps = torch.arange(num_new, device=self.k_int8.device)
        if self.key_padding_mask is None:
            return self.offset + steps
        return self.key_padding_mask.sum(-1, keepdim=True) + steps

    def nbytes(self) -> int:
        """Bytes held between steps (values, scales and the mask)."""
        parts = [self.k_int8, self.k_scale, self.v_int8, self.v_scale, self.key_padding_mask]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def int8_kv_cache(cache):
    """A decoding cache with every `KVCache` in it stored as `Int8KVCache` (a tuple of per-layer caches, as
    `LlamaLM`'s); the `cache_transform` of `polyattn.models.generation.stream_generate` for `--kv-cache int8`."""
    if isinstance(cache, KVCache):
        return Int8KVCache.from_cache(cache)
    if isinstance(cache, Int8KVCache):
        return cache
    if isinstance(cache, tuple) and cache and all(isinstance(c, (KVCache, Int8KVCache)) for c in cache):
        return tuple(int8_kv_cache(c) for c in cache)
    from ..errors import UserError

    raise UserError(f"An int8 KV cache needs a model whose decoding state is a softmax KV cache per layer (the "
                    f"LLaMA-style LM); this model's is a {type(cache).__name__}.")


__all__ = ["Int8KVCache", "int8_kv_cache", "quantize_per_head"]
