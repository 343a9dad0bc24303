"""LightNet language models: causal (trained in chunks, decoded as a recurrence) and bidirectional (masked LM).

arXiv 2405.21022 (Qin et al., LightNet); spec shared/reference/lightnet.md §3.4 (`LightNetLM`, `LightNetEncoder`),
§4. Both share one body (`LightNetText`) and differ by a constructor value, `causal`.

    tokens → embed → causal TPE (x + TPE(x)) → [h + LNA(RMSNorm(h)); h + GLU(RMSNorm(h))] × depth
           → RMSNorm → head (untied by default)

- LNA: causal LightNet attention (`polyattn.layers.lightnet.LightNetAttention(causal=True)`): keys soft-maxed
  over the prefix, chunk-parallel for multi-token calls, the recurrent step for single tokens; 1-D cosine LRPE
  on queries and normalised keys (positions count real tokens).
- TPE (§4.2): one causal decayed Toeplitz scan once after the embedding, added residually (the spec's
  recommendation; `tpe_residual=False` replaces the embedding as the author's LM code does).

Documents of different lengths: a padding `attention_mask [B, T]` (left or right padding are exact), or
documents packed into one row with `cu_seqlens [N + 1]`. Packed rows are unpacked into a right-padded batch once
at the embedding, run, and packed back, which is exactly how the LightNet op implements varlen itself; every
layer then sees each document on its own (TPE and LRPE restart at each document).

Decoding state (`LightNetLMCache`): the TPE scan state and one `LightNetCache` per layer (`S`, the
log-normaliser `z`, float32, and the layer's own real-token counter for LRPE). Cached calls accept left padding
only (prompts); padding inside a continued sequence would decay the TPE state.

`LightNetMLM` (the spec's bidirectional text encoder, §3.4) is the same body with `causal=False`:

    tokens → embed → two-sided TPE (x + TPE(x)) → [h + LNA(RMSNorm(h)); h + GLU(RMSNorm(h))] × depth
           → RMSNorm → head (tied, as BERT)

- LNA in its global form: per key channel a softmax over all (real) tokens, then two matmuls; one pass.
- TPE with the two-sided kernel `λ^{|t−s|}` (spec §4.3 recommendation for bidirectional text), added residually.
- 1-D cosine LRPE on queries and normalised keys, positions counting real tokens.
- Padding: padded keys get logit −inf before the softmax and a zero value, padded inputs are zeroed before the
  TPE scans; since padding sits at one end, left and right padding are both exact.
- `[MASK]` is the last vocabulary id, as for every masked LM (`polyattn.models.bert`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import parse_enum
from ..layers.lightnet import (
    GatePosition,
    LightNetAttention,
    LightNetBlock,
    LightNetCache,
    Lrpe,
    MdTpe,
    MixerInit,
    NormalizerInit,
    parse_lrpe,
)
from ..layers.mixer import MixerKind, build_mixer, mixer_class, mixer_options, refuse_changed
from ..layers.reversible import run_blocks, run_blocks_cached
from ..layers.token_io import TokenIO
from ..ops.sequence import pack_sequences, unpack_sequences
from ..registry import register_model
from .bert import MaskedLMMixin
from .generation import CausalLMMixin


class LightNetLMCache(NamedTuple):
    """Decoding state of `LightNetLM`.

    Attributes:
        tpe: `[B, H, D/H]` float32 causal TPE scan state, or None when the model has no TPE.
        layers: one `LightNetCache` per block.
    """

    tpe: torch.Tensor | None
    layers: tuple[LightNetCache, ...]


class LightNetText(nn.Module):
    """Embedding → 1-D TPE → LightNet blocks → RMSNorm → head: the body of `LightNetLM` (`causal=True`: prefix
    softmax, causal TPE) and `LightNetMLM` (`causal=False`: global one-scan softmax, two-sided TPE).

    Arguments as `LightNetLM`; subclasses add the loss of their task. `mixer` swaps LightNet attention for another
    token mixer (`polyattn.layers.mixer`, e.g. a kernelized linear attention) and keeps everything else; the
    LightNet options (`lrpe`, `scale`, `normalizer_init`, `init`, `kernel_backend`) must then stay at their defaults.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, mlp_hidden_dim: int | None,
                 lrpe: Lrpe | str | None, tpe: bool, tpe_residual: bool, scale: float | None,
                 normalizer_init: NormalizerInit | str, chunk_size: int, norm_eps: float, tie_embeddings: bool,
                 init: MixerInit | str, *, causal: bool, kernel_backend: str = "torch",
                 mixer: MixerKind | str | type[nn.Module] = MixerKind.LIGHTNET, reversible: bool = False,
                 gate_low_rank_dim: int | None = None, gate_position: GatePosition | str = GatePosition.PRE):
        super().__init__()
        self.reversible = reversible
        mixer = mixer if isinstance(mixer, type) else parse_enum(MixerKind, mixer, "mixer")
        cls = mixer_class(mixer)
        if cls is LightNetAttention:
            options = dict(lrpe=lrpe, scale=scale, normalizer_init=normalizer_init, chunk_size=chunk_size, init=init,
                           kernel_backend=kernel_backend, gate_low_rank_dim=gate_low_rank_dim,
                           gate_position=gate_position)
        else:
            name = type(self).__name__
            refuse_changed(name, mixer, "LightNet", lrpe=(parse_lrpe(lrpe), Lrpe.COSINE), scale=(scale, 1.0),
                           normalizer_init=(parse_enum(NormalizerInit, normalizer_init, "normalizer_init"),
                                            NormalizerInit.EMPTY),
                           init=(parse_enum(MixerInit, init, "init"), MixerInit.DEFAULT),
                           kernel_backend=(kernel_backend, "torch"), gate_low_rank_dim=(gate_low_rank_dim, None),
                           gate_position=(parse_enum(GatePosition, gate_position, "gate_position"),
                                          GatePosition.PRE))
            takes_chunks = "chunk_size" in mixer_options(cls)
            if not takes_chunks:
                refuse_changed(name, mixer, "chunked", chunk_size=(chunk_size, 64))
            options = dict(chunk_size=chunk_size) if takes_chunks else {}
        self.mixer = mixer
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.vocab_size, self.dim, self.depth, self.tie_embeddings = vocab_size, dim, depth, tie_embeddings
        self.causal = causal
        self.io = TokenIO(vocab_size, dim, tie_embeddings=tie_embeddings, norm_eps=norm_eps)
        self.tpe = MdTpe(dim, num_heads, num_axes=1, causal=causal, residual=tpe_residual, norm_eps=norm_eps) \
            if tpe else None
        self.blocks = nn.ModuleList(
            LightNetBlock(dim, build_mixer(mixer, dim, num_heads, causal=causal, **options),
                          mlp_hidden_dim=mlp_hidden_dim, norm_eps=norm_eps)
            for _ in range(depth))

    def _logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Logits `[B, T, V]` of `tokens [B, T]` with a padding mask or packed documents (module docstring)."""
        if cu_seqlens is None:
            return self._run(tokens, None if attention_mask is None else attention_mask.bool())
        if tokens.shape[0] != 1 or attention_mask is not None:
            raise ValueError("packed documents (cu_seqlens) need B == 1 and no attention_mask")
        padded, mask = unpack_sequences(tokens, cu_seqlens)
        return pack_sequences(self._run(padded, mask), mask)  # (N, T_max, V) → (1, ΣT, V)

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.io.embed_tokens(tokens)  # (B, T, D)
        if self.tpe is not None:
            x, _ = self.tpe(x, key_padding_mask=mask)
        x = run_blocks(self.blocks, x, reversible=self.reversible, key_padding_mask=mask)
        return self.io.logits(x)


class LightNetLM(CausalLMMixin, LightNetText):
    """Causal LightNet LM (module docstring).

    Args:
        vocab_size (int): number of token ids `V`. Default: 256 (byte-level).
        dim (int): width `D`. Default: 128.
        depth (int): number of blocks. Default: 4.
        num_heads (int): heads of LNA and TPE; head dim `D / H`. Default: 4.
        mlp_hidden_dim (int, Optional): GLU hidden width; None = `8D/3` rounded up to a multiple of 8.
        lrpe (str, Optional): "cosine" (exact under the causal decay), "rotary", or None. Default: "cosine".
        tpe (bool): the causal TPE after the embedding. Default: True.
        tpe_residual (bool): `x + TPE(x)` (True) or `TPE(x)` (the author's LM code). Default: True.
        scale (float, Optional): output scale of the LightNet core; None = `d^-0.5`. Default: 1.0 (the authors').
        normalizer_init (str): "empty" (`z_0 = −inf`) or "unit" (`z_0 = 0`, the author's LM code).
        chunk_size (int): chunk length of the parallel causal form (changes only round-off). Default: 64.
        norm_eps (float): RMSNorm epsilon. Default: 1e-6.
        tie_embeddings (bool): output head shares the embedding matrix. Default: False.
        init (str): "default" (trunc-normal 0.02) or "author" (Xavier gain 0.01, zero `o_proj`) for the mixers.
        gate_low_rank_dim (int, Optional): rank of LNA's low-rank output gate; None = the head dim (the author's
            later code; the earlier used H). Default: None.
        gate_position (str): "pre" (`norm(o ⊙ σ(u))`, the author's) or "post" (`norm(o) ⊙ σ(u)`). Default: "pre".
        kernel_backend (str): kernel of the causal chunked core: "torch" (default, the reference) or "fla"
            (flash-linear-attention's GLA kernel, CUDA only; see polyattn.ops.gla_backends).
        mixer (MixerKind | str | type): the token mixer; "lightnet" (default) or another causal one, e.g. a
            kernelized linear attention ("linear_elu", "performer", ...); the LightNet options then stay default.
        reversible (bool): run the blocks as a reversible stack (`polyattn.layers.reversible`: two coupled
            residual streams, activations recomputed in backward, training memory flat in depth). Default: False.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 mlp_hidden_dim: int | None = None, lrpe: Lrpe | str | None = "cosine", tpe: bool = True,
                 tpe_residual: bool = True, scale: float | None = 1.0,
                 normalizer_init: NormalizerInit | str = "empty",
                 chunk_size: int = 64, norm_eps: float = 1e-6, tie_embeddings: bool = False,
                 init: MixerInit | str = "default", kernel_backend: str = "torch",
                 mixer: MixerKind | str | type[nn.Module] = "lightnet", reversible: bool = False,
                 gate_low_rank_dim: int | None = None, gate_position: GatePosition | str = "pre"):
        super().__init__(vocab_size, dim, depth, num_heads, mlp_hidden_dim, lrpe, tpe, tpe_residual, scale,
                         normalizer_init, chunk_size, norm_eps, tie_embeddings, init, causal=True,
                         kernel_backend=kernel_backend, mixer=mixer, reversible=reversible,
                         gate_low_rank_dim=gate_low_rank_dim, gate_position=gate_position)


    def forward_cached(self, tokens: torch.Tensor, cache: LightNetLMCache | None = None, *,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LightNetLMCache]:
        """Continues `cache` (None = a new sequence) with `tokens [B, T]`: `(logits [B, T, V], new cache)`.

        Args:
            attention_mask (Tensor, Optional): `[B, T]` bool for the new tokens, True = real (left padding only).
        """
        mask = None if attention_mask is None else attention_mask.bool()
        if cache is not None and len(cache.layers) != self.depth:
            raise ValueError(f"the cache has {len(cache.layers)} layers, the model {self.depth}")
        x = self.io.embed_tokens(tokens)
        tpe_state = None
        if self.tpe is not None:
            x, tpe_state = self.tpe(x, key_padding_mask=mask, cache=None if cache is None else cache.tpe,
                                    use_cache=True)
        layer_kwargs = [dict(key_padding_mask=mask, cache=None if cache is None else cache.layers[i], use_cache=True)
                        for i in range(self.depth)]
        x, layers = run_blocks_cached(self.blocks, x, layer_kwargs, reversible=self.reversible)
        return self.io.logits(x), LightNetLMCache(tpe_state, tuple(layers))

    def state_size(self) -> int:
        """Floats per sequence in the decoding state (every layer's `S`, `z` and counter, plus the TPE state)."""
        tpe = self.dim if self.tpe is not None else 0
        return tpe + sum(block.attn.state_size() for block in self.blocks)


@register_model(LightNetLM, task="causal_lm")
def lightnet_lm_nano():
    """Causal LightNet LM (1-D LRPE + causal TPE), D 128, 4 layers, 4 heads: a CPU size."""
    return dict(dim=128, depth=4, num_heads=4)


@register_model(LightNetLM, task="causal_lm")
def lightnet_lm_tiny():
    """Causal LightNet LM, D 256, 6 layers, 4 heads."""
    return dict(dim=256, depth=6, num_heads=4)


@register_model(LightNetLM, task="causal_lm")
def lightnet_lm_small():
    """Causal LightNet LM in the GPT-3 Small / 125M-class shape: D 768, 12 layers, 12 heads."""
    return dict(dim=768, depth=12, num_heads=12)


@register_model(LightNetLM, task="causal_lm")
def linear_lm_nano():
    """Causal kernelized linear attention (elu+1; `model.mixer=performer|cosformer|hedgehog|linear_relu`) in the
    LightNet LM body (causal TPE, GLU), D 128, 4 layers, 4 heads."""
    return dict(dim=128, depth=4, num_heads=4, mixer="linear_elu")


class LightNetMLM(MaskedLMMixin, LightNetText):
    """Bidirectional LightNet encoder with a masked-LM head (module docstring).

    Args:
        vocab_size (int): number of token ids `V`, the last of them `[MASK]`. Default: 257 (256 bytes + `[MASK]`).
        dim (int): width `D`. Default: 128.
        depth (int): number of blocks. Default: 4.
        num_heads (int): heads of LNA and TPE; head dim `D / H`. Default: 4.
        mlp_hidden_dim (int, Optional): GLU hidden width; None = `8D/3` rounded up to a multiple of 8.
        lrpe (str, Optional): "cosine", "rotary" (both exact in the global form), or None. Default: "cosine".
        tpe (bool): the two-sided TPE after the embedding. Default: True.
        tpe_residual (bool): `x + TPE(x)` (True) or `TPE(x)`. Default: True.
        scale (float, Optional): output scale of the LightNet core; None = `d^-0.5`. Default: 1.0 (the authors').
        normalizer_init (str): "empty" (plain softmax over the tokens) or "unit" (an extra virtual key of logit 0
            and value 0 in every softmax).
        norm_eps (float): RMSNorm epsilon. Default: 1e-6.
        tie_embeddings (bool): output head shares the embedding matrix (BERT). Default: True.
        init (str): "default" (trunc-normal 0.02) or "author" (Xavier gain 0.01, zero `o_proj`) for the mixers.
        mixer (MixerKind | str | type): the token mixer, as `LightNetLM`'s (built bidirectional).
    """

    def __init__(self, vocab_size: int = 257, dim: int = 128, depth: int = 4, num_heads: int = 4,
                 mlp_hidden_dim: int | None = None, lrpe: Lrpe | str | None = "cosine", tpe: bool = True,
                 tpe_residual: bool = True, scale: float | None = 1.0,
                 normalizer_init: NormalizerInit | str = "empty",
                 norm_eps: float = 1e-6, tie_embeddings: bool = True, init: MixerInit | str = "default",
                 mixer: MixerKind | str | type[nn.Module] = "lightnet"):
        super().__init__(vocab_size, dim, depth, num_heads, mlp_hidden_dim, lrpe, tpe, tpe_residual, scale,
                         normalizer_init, 64, norm_eps, tie_embeddings, init, causal=False, mixer=mixer)



@register_model(LightNetMLM, task="masked_lm")
def lightnet_mlm_nano():
    """Bidirectional LightNet masked LM (1-D LRPE + two-sided TPE), D 128, 4 layers, 4 heads: a CPU size."""
    return dict(dim=128, depth=4, num_heads=4)


@register_model(LightNetMLM, task="masked_lm")
def lightnet_mlm_tiny():
    """Bidirectional LightNet masked LM, D 256, 6 layers, 4 heads."""
    return dict(dim=256, depth=6, num_heads=4)


@register_model(LightNetMLM, task="masked_lm")
def lightnet_mlm_base():
    """Bidirectional LightNet masked LM in the BERT-base shape: D 768, 12 layers, 12 heads."""
    return dict(dim=768, depth=12, num_heads=12)


@register_model(LightNetMLM, task="masked_lm")
def linear_mlm_nano():
    """Bidirectional kernelized linear attention (elu+1; `model.mixer=performer|...`) in the LightNet MLM body
    (two-sided TPE, GLU), D 128, 4 layers, 4 heads."""
    return dict(dim=128, depth=4, num_heads=4, mixer="linear_elu")
