"""LLaMA-style causal language model: the softmax-attention baseline for text.

arXiv 2302.13971 (LLaMA): pre-norm blocks with RMSNorm (arXiv 1910.07467), SwiGLU MLPs (arXiv 2002.05202),
rotary position embeddings (arXiv 2104.09864) and causal softmax attention, optionally with grouped kv heads
(arXiv 2305.13245). No biases.

    tokens → embed → [x + Attn(RMSNorm(x), RoPE, causal); x + SwiGLU(RMSNorm(x))] × depth → RMSNorm → head

Head: untied by default, as in LLaMA; `tie_embeddings=True` reuses the embedding matrix (saves `V·D` parameters,
which matters for small models with large vocabularies).

Documents of different lengths: a padding `attention_mask [B, T]` (left or right padding; RoPE positions count
real tokens only, so a padded row equals its unpadded version), or documents packed into one row with
`cu_seqlens [N + 1]`: positions restart at each document and a block-diagonal causal mask keeps documents apart.
That mask is `[ΣT, ΣT]`; fine for training-size rows (a flash-attn varlen kernel would avoid it).

Decoding: `forward_cached` (see `polyattn.models.generation`) with a tuple of one `KVCache` per layer; each layer
derives its RoPE positions from its own cache's count of real tokens.

LongLoRA S²-Attn (arXiv 2309.12307; spec `perceiver_ar_and_llp.md` §3) is an option, `s2_group_size=G`: tokens
are split into groups of G, half the heads attend causally within the groups, the other half within groups
shifted by G/2 (`polyattn.ops.attention.shifted_group_mask_at`, the mask form: nothing wraps around the ends of
the sequence). Groups are taken over the real-token positions, so padding and packing stay exact. As in LongLoRA,
it is a training-time approximation: in eval mode and in generation the model attends with full causal attention
unless `s2_at_inference=True`, which keeps the grouped mask there too (cached decoding then masks the cache by
position, so cached and uncached generation still agree). Whole rows (no padding, no packing, no cache: the
training batches) run it group by group (`polyattn.ops.attention.shifted_group_attention`), LongLoRA's O(T·G)
cost; padded rows, packed documents and cached calls use the mask form, which materialises an `[H, T, T]` mask
and runs dense attention (tests compare the two).

`RopeTransformer` is the body shared with the bidirectional encoder (`polyattn.models.bert`): the same blocks,
causal or not by a constructor value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..layers.attention import Attention, KVCache
from ..layers.block import TransformerBlock
from ..layers.mlp import GatedMlp, llama_hidden_size
from ..layers.mod import MixtureOfDepths, Routing, check_capacity
from ..layers.norm import RMSNorm
from ..layers.reversible import run_blocks, run_blocks_cached
from ..layers.rope import RotaryEmbedding
from ..layers.token_io import TokenIO
from ..ops.attention import shifted_group_attention, shifted_group_mask_at
from ..ops.sequence import cat_padding_masks, document_positions, real_positions
from ..registry import register_model
from .generation import CausalLMMixin

LlamaCache = tuple[KVCache, ...]
"""The decoding state of `LlamaLM`: one `KVCache` per layer (keys stored after RoPE)."""


def _positions(cache: KVCache | None, mask: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """RoPE positions `[T]` or `[B, T]` of `T` new tokens: the real tokens seen so far plus the real tokens before
    each new one in this call (see `real_positions`)."""
    if cache is None:
        start = 0
    else:
        start = cache.offset if cache.key_padding_mask is None else cache.key_padding_mask.sum(-1)
    return real_positions(mask, T, start=start, device=device)


def _key_positions(cache: KVCache | None, mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Positions `[S]` or `[B, S]` of every key a cached call attends to: the cache's, then the new tokens'."""
    B, T = tokens.shape
    old = 0 if cache is None else cache.offset
    full = cat_padding_masks(None if cache is None else cache.key_padding_mask, mask, (B, old), (B, T),
                             tokens.device)
    return real_positions(full, old + T, device=tokens.device)


class RopeTransformer(nn.Module):
    """Embedding → pre-norm RoPE blocks (RMSNorm, softmax attention, SwiGLU) → RMSNorm → head.

    The body of `LlamaLM` (`causal=True`) and `BertMLM` (`causal=False`); arguments as `LlamaLM`. Subclasses add
    the loss of their task. `s2_group_size` / `s2_at_inference`: the S²-Attn option (module docstring).
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, num_kv_heads: int | None,
                 mlp_hidden_dim: int | None, rope_base: float, norm_eps: float, tie_embeddings: bool, dropout: float,
                 *, causal: bool, s2_group_size: int | None = None, s2_at_inference: bool = False,
                 reversible: bool = False, mod_capacity: float | None = None):
        super().__init__()
        self.reversible = reversible
        if mod_capacity is not None:
            mod_capacity = check_capacity(mod_capacity)
            for clash, why in ((not causal, "a causal model (its inference routing is the causal predictor)"),
                               (reversible, "reversible=False (a routed block changes only its chosen tokens)"),
                               (s2_group_size is not None, "no s2_group_size (its groups assume every token)")):
                if clash:
                    raise ValueError(f"mod_capacity (Mixture-of-Depths) needs {why}; set mod_capacity=None")
        self.mod_capacity = mod_capacity
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if s2_group_size is not None and s2_group_size < 2:
            raise ValueError(f"s2_group_size must be at least 2 tokens (or None for full attention), got "
                             f"{s2_group_size}")
        self.vocab_size, self.dim, self.depth, self.tie_embeddings = vocab_size, dim, depth, tie_embeddings
        self.num_heads, self.causal = num_heads, causal
        self.s2_group_size, self.s2_at_inference = s2_group_size, s2_at_inference
        self.io = TokenIO(vocab_size, dim, tie_embeddings=tie_embeddings, norm_eps=norm_eps)
        self.rope = RotaryEmbedding(dim // num_heads, base=rope_base)
        hidden = mlp_hidden_dim or llama_hidden_size(dim, multiple_of=64)
        norm = lambda d: RMSNorm(d, eps=norm_eps)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, Attention(dim, num_heads, num_kv_heads=num_kv_heads, proj_bias=False,
                                            mask_mode="causal" if causal else "bidirectional", attn_drop=dropout,
                                            proj_drop=dropout),
                             GatedMlp(dim, hidden, drop=dropout), norm)
            for _ in range(depth))
        # Mixture-of-Depths: a router around every other block (the paper's best), the first block sees every token
        self.mod = (nn.ModuleDict({str(i): MixtureOfDepths(dim, mod_capacity) for i in range(1, depth, 2)})
                    if mod_capacity is not None else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for embeddings and linears; the projections that write into the residual stream
        (`o_proj`, `w2`) scaled by `1/√(2·depth)` (GPT-2) so the residual variance does not grow with depth."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.w2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.depth))

    def s2_active(self) -> bool:
        """Whether attention is S²-grouped now: with a group size, in training (or always with s2_at_inference)."""
        return self.s2_group_size is not None and (self.training or self.s2_at_inference)

    def _s2_mask(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        mask = shifted_group_mask_at(q_positions, k_positions, self.s2_group_size, self.num_heads,
                                     causal=self.causal)
        return mask if mask.ndim == 4 else mask[None]  # (B | 1, H, T, S)

    def _routed_blocks(self, x: torch.Tensor, positions: torch.Tensor, *, causal: bool,
                       caches: Sequence[KVCache | None] | None = None,
                       use_cache: bool = False) -> tuple[torch.Tensor, list, list[Routing]]:
        """The block loop of a Mixture-of-Depths model (`mod_capacity`): `(x, new caches, Routing of each routed
        block)`; `causal` routes by the predictor (inference, decoding), else by the top-k of each sequence."""
        rope = self.rope(positions)
        new_caches, routings = [], []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if str(i) in self.mod:
                x, cache, routing = self.mod[str(i)](block, x, positions, self.rope, causal=causal, cache=cache,
                                                     use_cache=use_cache)
                routings.append(routing)
            else:
                x, cache = block(x, rope=rope, cache=cache, use_cache=use_cache)
            new_caches.append(cache)
        return x, new_caches, routings

    def _logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None, *,
                with_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        """Logits `[B, T, V]` of `tokens [B, T]` with a padding mask or packed documents (see `LlamaLM.forward`),
        and with `with_routing` the `Routing` of each routed block (a Mixture-of-Depths model)."""
        B, T = tokens.shape
        if self.mod is not None:
            if attention_mask is not None and bool(attention_mask.bool().all()):
                attention_mask = None  # every token real: no padding (what transformers' generate passes)
            if attention_mask is not None or cu_seqlens is not None:
                raise ValueError("a Mixture-of-Depths model (mod_capacity) routes whole rows of real tokens; it "
                                 "takes no padding (attention_mask) or cu_seqlens")
            positions = torch.arange(T, device=tokens.device)
            x, _, routings = self._routed_blocks(self.io.embed_tokens(tokens), positions, causal=not self.training)
            logits = self.io.logits(x)
            return (logits, routings) if with_routing else logits
        if with_routing:
            raise ValueError("this model routes no tokens; build it with mod_capacity to get its routing")
        attn_mask, key_padding_mask = None, None
        if cu_seqlens is not None:
            if B != 1 or attention_mask is not None:
                raise ValueError("packed documents (cu_seqlens) need B == 1 and no attention_mask")
            doc, positions = document_positions(cu_seqlens.to(tokens.device), T)
            attn_mask = (doc[:, None] == doc[None, :])[None, None]  # (1, 1, T, T): block-diagonal
        else:
            if attention_mask is not None:
                key_padding_mask = attention_mask.bool()
            positions = _positions(None, key_padding_mask, T, tokens.device)
        groups = {}
        if self.s2_active() and attn_mask is None and key_padding_mask is None:  # whole rows: group by group, O(T·G)
            groups = {"block_sparse": partial(shifted_group_attention, group_size=self.s2_group_size)}
        elif self.s2_active():  # padding or packed documents: the mask form over the real-token positions
            s2 = self._s2_mask(positions, positions)  # (B | 1, H, T, T)
            attn_mask = s2 if attn_mask is None else attn_mask & s2
        rope = self.rope(positions)
        x = self.io.embed_tokens(tokens)  # (B, T, D)
        x = run_blocks(self.blocks, x, reversible=self.reversible, rope=rope, key_padding_mask=key_padding_mask,
                       attn_mask=attn_mask, **groups)
        return self.io.logits(x)  # (B, T, V)


class LlamaLM(CausalLMMixin, RopeTransformer):
    """LLaMA-style decoder-only LM (module docstring).

    Args:
        vocab_size (int): number of token ids `V`. Default: 256 (byte-level).
        dim (int): width `D`. Default: 128.
        depth (int): number of blocks. Default: 4.
        num_heads (int): attention heads. Default: 4.
        num_kv_heads (int, Optional): key/value heads (grouped-query attention); None = `num_heads`.
        mlp_hidden_dim (int, Optional): SwiGLU hidden width; None = LLaMA's `8D/3` rounded up to a multiple of 64.
        rope_base (float): RoPE frequency base. Default: 10000.0.
        norm_eps (float): RMSNorm epsilon. Default: 1e-6.
        tie_embeddings (bool): output head shares the embedding matrix. Default: False.
        dropout (float): dropout on attention weights and residual branches (training only). Default: 0.0.
        s2_group_size (int, Optional): LongLoRA S²-Attn group size `G` (module docstring); None = full causal
            attention. Default: None.
        s2_at_inference (bool): keep S²-Attn in eval mode and generation too (LongLoRA: full attention there).
            Default: False.
        reversible (bool): run the blocks as a reversible stack (`polyattn.layers.reversible`: two coupled
            residual streams, activations recomputed in backward, training memory flat in depth). Default: False.
        mod_capacity (float, Optional): Mixture-of-Depths (arXiv 2404.02258, `polyattn.layers.mod`): every other
            block computes only this share of each sequence's tokens (the top-k of a router in training, the
            causal predictor's choice in eval mode and decoding; 0.125 in the paper). None = every block computes
            every token. Default: None.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 num_kv_heads: int | None = None, mlp_hidden_dim: int | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, tie_embeddings: bool = False, dropout: float = 0.0,
                 s2_group_size: int | None = None, s2_at_inference: bool = False, reversible: bool = False,
                 mod_capacity: float | None = None):
        super().__init__(vocab_size, dim, depth, num_heads, num_kv_heads, mlp_hidden_dim, rope_base, norm_eps,
                         tie_embeddings, dropout, causal=True, s2_group_size=s2_group_size,
                         s2_at_inference=s2_at_inference, reversible=reversible, mod_capacity=mod_capacity)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                return_routing: bool = False):
        """As `CausalLMMixin.forward`; with `return_routing` (a Mixture-of-Depths model, no `targets`)
        `(logits, [Routing of each routed block])`: the tokens each computed and, in training, its predictor's
        loss (which the causal-LM task adds to the model's)."""
        if not return_routing:
            return super().forward(tokens, targets, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        if targets is not None:
            raise ValueError("return_routing gives (logits, routing); compute the loss from the logits")
        return self._logits(tokens, attention_mask, cu_seqlens, with_routing=True)


    def forward_cached(self, tokens: torch.Tensor, cache: LlamaCache | None = None, *,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LlamaCache]:
        """Continues `cache` (None = a new sequence) with `tokens [B, T]`: `(logits [B, T, V], new cache)`.

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool for the new tokens, True = real (left-padded prompts).
        """
        mask = None if attention_mask is None else attention_mask.bool()
        if cache is not None and len(cache) != self.depth:
            raise ValueError(f"the cache has {len(cache)} layers, the model {self.depth}")
        T = tokens.shape[1]
        if self.mod is not None:  # decoding routes by the causal predictor; block 0 (never routed) counts positions
            if mask is not None and not bool(mask.all()):
                raise ValueError("a Mixture-of-Depths model (mod_capacity) decodes rows of real tokens only; it "
                                 "takes no padding (attention_mask)")
            positions = _positions(None if cache is None else cache[0], None, T, tokens.device)
            x, new_cache, _ = self._routed_blocks(self.io.embed_tokens(tokens), positions, causal=True,
                                                  caches=cache, use_cache=True)
            return self.io.logits(x), tuple(new_cache)
        attn_mask = None
        if self.s2_active():  # every layer has seen the same tokens: one mask over (cache + new) keys
            first = None if cache is None else cache[0]
            attn_mask = self._s2_mask(_positions(first, mask, T, tokens.device), _key_positions(first, mask, tokens))
        x = self.io.embed_tokens(tokens)
        layer_kwargs = []
        for i in range(self.depth):
            layer_cache = None if cache is None else cache[i]
            layer_kwargs.append(dict(rope=self.rope(_positions(layer_cache, mask, T, tokens.device)),
                                     key_padding_mask=mask, attn_mask=attn_mask, cache=layer_cache, use_cache=True))
        x, new_cache = run_blocks_cached(self.blocks, x, layer_kwargs, reversible=self.reversible)
        return self.io.logits(x), tuple(new_cache)


@register_model(LlamaLM, task="causal_lm")
def llama_lm_nano():
    """LLaMA-style causal LM, D 128, 4 layers, 4 heads: a CPU size for minutes of training."""
    return dict(dim=128, depth=4, num_heads=4)


@register_model(LlamaLM, task="causal_lm")
def llama_lm_tiny():
    """LLaMA-style causal LM, D 256, 6 layers, 4 heads."""
    return dict(dim=256, depth=6, num_heads=4)


@register_model(LlamaLM, task="causal_lm")
def llama_lm_small():
    """LLaMA-style causal LM in the GPT-3 Small / 125M-class shape: D 768, 12 layers, 12 heads."""
    return dict(dim=768, depth=12, num_heads=12)
