"""The row-stacking variants of Perceiver AR in arXiv 2412.06106 (Mahmood & Huang; the authors' code
MetaMain/ECPTransformer): Double, Split and Compressed attention. Spec `reference/perceiver_ar_and_llp.md` §2.5–2.7.

Perceiver AR (`perceiver_ar`) reads its prefix once, in layer 0, and never refines it ("lossy history"). These
variants stack the context rows with the latents and carry them through the layers, each a different trade of
compute for context; as in Perceiver AR only the N latents are trained and scored.

- `DoubleAttentionPerceiver` (§2.5): every layer carries all n rows; context rows attend to context rows
  bidirectionally (`t < h: u < h`), latent rows to everything before them (`t ≥ h: u ≤ t`), `double_mask`.
  O(h² + N·n) per layer.
- `SplitAttentionPerceiver` (§2.7): as Double, but a context row sees only its own of S segments of the context,
  `t < h: u < h ∧ σ(u) = σ(t)` with `σ(t) = ⌊t·S/h⌋`, `split_mask`. O(h²/S + N·n).
- `CompressedAttentionPerceiver` (§2.6): layer 0 as Double; then the h context rows are mixed along the sequence
  axis into `c = compressed_len` rows by a learned `P: R^h → R^c` (Linformer-style), and the later layers carry
  c + N rows with the Double mask in compacted coordinates. `P` fixes h, so a shorter window is left-padded to n.
  O(c² + N·(c + N)) after layer 0.

Context rows attend bidirectionally, so their outputs depend on later context tokens: they are never scored
(§7.6), and decoding recomputes the window (`WindowCache`), since a step that turns a latent into context changes
every row. The latents are causal. With every position a latent (T ≤ N), Double and Split *are* `llama_lm`.

Faithful mode (§2.9): the family's faithful block (`perceiver_family`); RoPE in layer 0 only except in Double
attention (every layer); for Compressed the authors' misaligned residual (the embeddings of the *first* c + N
tokens) and a `projection_hist` built in every layer but used in layer 0 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import double_mask, split_mask
from ..ops.sequence import cat_padding_masks, real_counts, real_positions
from ..registry import register_model
from .perceiver_family import LatentPerceiver, feed_forward


class ContextRefiningPerceiver(LatentPerceiver):
    """Double and Split attention: every layer carries every window row, under the mask of `context_mask`.

    `forward_features` returns all `[B, T, D]` rows of the window, the context rows included (they are not
    causal). A subclass defines `context_mask(window_pos [B, T], context_len [B]) -> allowed [B, T, T]`.
    """

    def context_mask(self, window_pos: torch.Tensor, context_len: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _trunk(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
               num_latents: int) -> torch.Tensor:
        B, T = tokens.shape
        L = min(T, num_latents)
        window_pos = real_positions(mask, T, batch_size=B, device=tokens.device)  # t, u: real index in the window
        real = real_counts(mask, T, batch_size=B, device=tokens.device)
        context = real - real.clamp(max=L)  # h per row: real tokens before the latent columns
        allowed = self.context_mask(window_pos, context)[:, None]  # (B, 1, T, T)
        x = self.io.embed_tokens(tokens)
        for i, block in enumerate(self.blocks):
            x, _ = block(x, rope=self._rotary(i, positions), attn_mask=allowed, key_padding_mask=mask)
        return x


class DoubleAttentionPerceiver(ContextRefiningPerceiver):
    """Double attention (arXiv 2412.06106 §2.5, the authors' `DoubleAttentionTransformer`): the context refined
    in every layer (module docstring).

    Args:
        vocab_size (int): token ids `V`. Default: 256 (byte-level).
        dim (int): width `D`. Default: 128.
        depth (int): blocks. Default: 4.
        num_heads (int): attention heads, in every layer. Default: 4.
        max_seq_len (int): the window `n`: the most tokens one forward reads. Default: 1024.
        num_latents (int): latents `N ≤ n`, the positions that are trained and scored. Default: 512.
        faithful (bool): reproduce the authors' code (module docstring). Default: False.
        dropout, rope_base, norm_eps, mlp_hidden_dim, tie_embeddings: as `PerceiverAR`.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 max_seq_len: int = 1024, num_latents: int = 512, faithful: bool = False,
                 dropout: float | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6,
                 mlp_hidden_dim: int | None = None, tie_embeddings: bool = False):
        super().__init__(vocab_size, dim, depth, num_heads, max_seq_len, num_latents, faithful=faithful,
                         dropout=dropout, rope_base=rope_base, norm_eps=norm_eps, mlp_hidden_dim=mlp_hidden_dim,
                         tie_embeddings=tie_embeddings, faithful_rope_every_layer=True)
        self.reset_parameters()

    def context_mask(self, window_pos: torch.Tensor, context_len: torch.Tensor) -> torch.Tensor:
        return double_mask(window_pos, window_pos, context_len)


class SplitAttentionPerceiver(ContextRefiningPerceiver):
    """Split attention (arXiv 2412.06106 §2.7, the authors' `sSplitAttentionTransformer`): each context row
    refined within its own segment of the context (module docstring).

    Args:
        vocab_size, dim, depth, num_heads, max_seq_len, num_latents: as `DoubleAttentionPerceiver`.
        num_segments (int): context segments `S`. Default: 4.
        faithful (bool): reproduce the authors' code (module docstring). Default: False.
        dropout, rope_base, norm_eps, mlp_hidden_dim, tie_embeddings: as `PerceiverAR`.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 max_seq_len: int = 1024, num_latents: int = 512, num_segments: int = 4, faithful: bool = False,
                 dropout: float | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6,
                 mlp_hidden_dim: int | None = None, tie_embeddings: bool = False):
        if num_segments < 1:
            raise ValueError(f"num_segments must be at least 1, got {num_segments}")
        super().__init__(vocab_size, dim, depth, num_heads, max_seq_len, num_latents, faithful=faithful,
                         dropout=dropout, rope_base=rope_base, norm_eps=norm_eps, mlp_hidden_dim=mlp_hidden_dim,
                         tie_embeddings=tie_embeddings)
        self.num_segments = num_segments
        self.reset_parameters()

    def context_mask(self, window_pos: torch.Tensor, context_len: torch.Tensor) -> torch.Tensor:
        return split_mask(window_pos, window_pos, context_len, self.num_segments)


class CompressedAttentionPerceiver(LatentPerceiver):
    """Compressed double attention (arXiv 2412.06106 §2.6, the authors' `CompressedDoubleAttentionTransformer`):
    layer 0 as Double attention, then the context compressed to `c` rows (module docstring).

    `forward_features` returns the `[B, c + N, D]` rows of the last layer.

    Args:
        vocab_size, dim, depth, num_heads, max_seq_len, num_latents: as `DoubleAttentionPerceiver`; N is fixed
            by the compression (no `num_latents` per call).
        compressed_len (int, Optional): compressed context rows `c`. Default: `n // 4` (the authors' script).
        faithful (bool): reproduce the authors' code (module docstring). Default: False.
        dropout, rope_base, norm_eps, mlp_hidden_dim, tie_embeddings: as `PerceiverAR`.
    """

    def forward_blocks(self) -> list[nn.Module]:
        """Layers 1…: layer 0 is run through its parts, with the compression between its two sub-layers
        (`polyattn.train.sharding.repeated_blocks`)."""
        return list(self.blocks[1:])

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 max_seq_len: int = 1024, num_latents: int = 512, compressed_len: int | None = None,
                 faithful: bool = False, dropout: float | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, mlp_hidden_dim: int | None = None, tie_embeddings: bool = False):
        super().__init__(vocab_size, dim, depth, num_heads, max_seq_len, num_latents, faithful=faithful,
                         dropout=dropout, rope_base=rope_base, norm_eps=norm_eps, mlp_hidden_dim=mlp_hidden_dim,
                         tie_embeddings=tie_embeddings)
        self.compressed_len = compressed_len or max_seq_len // 4
        if self.context_len < 1 or self.compressed_len < 1:
            raise ValueError("the compressed variant needs a context (num_latents < max_seq_len) and "
                             "compressed_len >= 1")
        # P: R^h → R^c along the sequence axis; the authors build one per layer and use the first (§2.6).
        self.compress = nn.ModuleList(nn.Linear(self.context_len, self.compressed_len)
                                      for _ in range(depth if faithful else 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for p in self.compress:  # mixes h rows: variance-preserving
            nn.init.normal_(p.weight, std=p.in_features ** -0.5)
            nn.init.zeros_(p.bias)

    def _num_latents(self, num_latents: int | None) -> int:
        if num_latents is not None and num_latents != self.num_latents:
            raise ValueError("the compressed variant's latent count is fixed by its compression (h = n − N)")
        return self.num_latents

    def _trunk(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
               num_latents: int) -> torch.Tensor:
        """Compressed double attention over a window left-padded to n columns; rows `[B, c + N, D]`."""
        n, h, c = self.max_seq_len, self.context_len, self.compressed_len
        B, T = tokens.shape
        if tokens.shape[1] < n:  # P: R^h → R^c needs exactly h context columns
            none = torch.zeros(B, n - T, dtype=torch.bool, device=tokens.device)
            mask = cat_padding_masks(none, mask, none.shape, (B, T), tokens.device)
            tokens, positions = F.pad(tokens, (n - T, 0)), F.pad(positions, (n - T, 0))
        cols = torch.arange(n, device=tokens.device)
        block = self.blocks[0]
        x = self.io.embed_tokens(tokens)  # (B, n, D)
        y, _ = block.attn(block.norm1(x), rope=self._rotary(0, positions), attn_mask=double_mask(cols, cols, h),
                          key_padding_mask=mask)
        squeeze = lambda z: self.compress[0](z.transpose(1, 2)).transpose(1, 2)  # (B, h, D) → (B, c, D)
        if self.faithful:  # the authors' residual: the embeddings of the first c + N tokens, misaligned
            x = torch.cat((squeeze(y[:, :h]), y[:, h:]), 1) + x[:, :c + self.num_latents]
        else:  # compress the context rows of the residual stream after the attention sub-layer
            x = x + block.drop_path(y)
            x = torch.cat((squeeze(x[:, :h]), x[:, h:]), 1)
        x = feed_forward(block, x)  # (B, c + N, D)
        rows = torch.arange(c + self.num_latents, device=tokens.device)
        pad = None if mask is None else torch.cat((mask.new_ones(B, c), mask[:, h:]), 1)
        # compressed rows have no position: NaN leaves them unrotated
        pos = torch.cat((torch.full((B, c), float("nan"), device=tokens.device), positions[:, h:].float()), 1)
        allowed = double_mask(rows, rows, c)
        for i, block in enumerate(self.blocks[1:], start=1):
            x, _ = block(x, rope=self._rotary(i, pos), attn_mask=allowed, key_padding_mask=pad)
        return x


@register_model(DoubleAttentionPerceiver, task="causal_lm")
def perceiver_double_nano():
    """Double attention (arXiv 2412.06106): the context refined in every layer; D 128, 4 layers, 1024/512 latents."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512)


@register_model(CompressedAttentionPerceiver, task="causal_lm")
def perceiver_compressed_nano():
    """Compressed double attention (arXiv 2412.06106): context 512 → 256 rows after layer 0; D 128, 4 layers."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512, compressed_len=256)


@register_model(SplitAttentionPerceiver, task="causal_lm")
def perceiver_split_nano():
    """Split attention (arXiv 2412.06106): context in 4 segments; D 128, 4 layers, window 1024, 512 latents."""
    return dict(dim=128, depth=4, num_heads=4, max_seq_len=1024, num_latents=512, num_segments=4)


__all__ = ["CompressedAttentionPerceiver", "ContextRefiningPerceiver", "DoubleAttentionPerceiver",
           "SplitAttentionPerceiver"]
