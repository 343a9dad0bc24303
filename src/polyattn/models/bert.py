"""BERT-style masked language model: a bidirectional pre-norm encoder trained to fill in masked tokens.

arXiv 1810.04805 (BERT) objective and shapes, with the modern block of the library's causal baseline
(`polyattn.models.llama_lm`): pre-norm RMSNorm (arXiv 1910.07467), SwiGLU MLP (arXiv 2002.05202), rotary positions
(arXiv 2104.09864), no biases, full (bidirectional) softmax attention.

    tokens → embed → [x + Attn(RMSNorm(x), RoPE); x + SwiGLU(RMSNorm(x))] × depth → RMSNorm → head (tied)

Choices, and why:
- SwiGLU rather than BERT's GELU MLP: the same channel mixer as the causal baseline (`LlamaLM`) and as
  LightNet's GLU, so that comparisons between token mixers change only the token mixer; the hidden width `8D/3`
  keeps the parameter budget of a `4D` GELU MLP.
- RoPE rather than BERT's learned absolute positions: no maximum length, relative positions, and positions that
  count real tokens only, so a padded row (left or right padding) equals its unpadded version exactly.
- Head tied to the embedding (BERT ties its MLM decoder to the input embeddings), without BERT's extra
  dense + LayerNorm transform before it.

The mask token: `[MASK]` is the last id of the model's vocabulary, `mask_token_id = vocab_size − 1`. The masked-LM
task (`polyattn.tasks.masked_lm`) sizes the model one id above its tokenizer: byte-level text has 256 ids, so the
model has 257 and `[MASK]` = 256; with BPE, `[MASK]` = the tokenizer's vocabulary size. The tokenizer never
produces it.

Documents of different lengths: a padding `attention_mask [B, T]` (padded keys get no weight), or documents packed
into one row with `cu_seqlens [N + 1]` (a block-diagonal mask; positions restart at each document).

`MaskedLMMixin` is what every masked LM of the library shares (BERT, bidirectional LightNet).
"""

from __future__ import annotations

import torch

from ..ops.losses import cross_entropy
from ..registry import register_model
from .llama_lm import RopeTransformer


class MaskedLMMixin:
    """What every masked LM shares: `forward` over its `_logits(tokens, attention_mask, cu_seqlens)` with the loss
    on the masked positions, and its `[MASK]` id."""

    vocab_size: int

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, T, V]` of `tokens [B, T]` (with `[MASK]` ids in it), or `(logits, loss)` with `targets`.

        Args:
            tokens (Tensor): `[B, T]` int64.
            targets (Tensor, Optional): `[B, T]` int64, the original tokens at the masked positions, `IGNORE_INDEX`
                elsewhere (unmasked tokens and padding; the loss is their mean cross-entropy).
            attention_mask (Tensor, Optional): `[B, T]` bool/0-1, True = real token (padding mask).
            cu_seqlens (Tensor, Optional): `[N + 1]` offsets of documents packed into one row (`B == 1`).
        """
        logits = self._logits(tokens, attention_mask, cu_seqlens)
        return logits if targets is None else (logits, cross_entropy(logits, targets))

    @property
    def mask_token_id(self) -> int:
        """The reserved `[MASK]` id: the last id of the vocabulary (module docstring)."""
        return self.vocab_size - 1


class BertMLM(MaskedLMMixin, RopeTransformer):
    """Bidirectional pre-norm encoder with a masked-LM head (module docstring).

    Args:
        vocab_size (int): number of token ids `V`, the last of them `[MASK]`. Default: 257 (256 bytes + `[MASK]`).
        dim (int): width `D`. Default: 128.
        depth (int): number of blocks. Default: 4.
        num_heads (int): attention heads. Default: 4.
        num_kv_heads (int, Optional): key/value heads (grouped-query attention); None = `num_heads`.
        mlp_hidden_dim (int, Optional): SwiGLU hidden width; None = `8D/3` rounded up to a multiple of 64.
        rope_base (float): RoPE frequency base. Default: 10000.0.
        norm_eps (float): RMSNorm epsilon. Default: 1e-6.
        tie_embeddings (bool): output head shares the embedding matrix (BERT). Default: True.
        dropout (float): dropout on attention weights and residual branches (training only). Default: 0.0.
    """

    def __init__(self, vocab_size: int = 257, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 num_kv_heads: int | None = None, mlp_hidden_dim: int | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, tie_embeddings: bool = True, dropout: float = 0.0):
        super().__init__(vocab_size, dim, depth, num_heads, num_kv_heads, mlp_hidden_dim, rope_base, norm_eps,
                         tie_embeddings, dropout, causal=False)



@register_model(BertMLM, task="masked_lm")
def bert_nano():
    """BERT-style masked LM (RoPE, SwiGLU, pre-RMSNorm), D 128, 4 layers, 4 heads: a CPU size."""
    return dict(dim=128, depth=4, num_heads=4)


@register_model(BertMLM, task="masked_lm")
def bert_tiny():
    """BERT-style masked LM, D 256, 6 layers, 4 heads."""
    return dict(dim=256, depth=6, num_heads=4)


@register_model(BertMLM, task="masked_lm")
def bert_base():
    """BERT-style masked LM in the BERT-base shape: D 768, 12 layers, 12 heads."""
    return dict(dim=768, depth=12, num_heads=12)
