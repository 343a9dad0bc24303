"""Token-to-token attention maps of the image classifiers, and the attention-map rank of the iLLaMA paper.

The map of a token mixer that is linear in its values, `o_t = Σ_s A[t, s] v_s` per head, is read from the
operator itself: during one forward pass each mixer's op is called a second time with one-hot values
(`v_s = e_s ∈ R^S`), and the output of query t is then the row `A[t, :]`. The op call is taken from the mixers'
hook point (`polyattn.layers.mixer_hooks`: every mixer layer calls its op through `call_op`), so the analysis does
not depend on where or how a layer imports its op. The map therefore holds everything the
layer applies to queries and keys — RoPE, LRPE, masks, the soft mask, the scale — exactly as in the forward
pass, with one implementation of each (the ops'), and nothing that acts per token afterwards (output gate,
norm, projection).

- Softmax attention (ViT, iLLaMA; `polyattn.layers.attention.Attention`): `A = softmax(q kᵀ · scale)` under the
  layer's mask operator (`polyattn.ops.attention.MaskMode`). Rows sum to 1, except under `illama_soft` with
  `a < 1`, whose post-softmax mask is not renormalised.
- Non-causal LightNet attention (`polyattn.layers.lightnet.LightNetAttention`):
  `o_t = scale · Σ_i q_t[i] Σ_s softmax_s(k[:, i])[s] v_s`, so `A[t, s] = scale · Σ_i q_t[i] · softmax_s(k[:, i])[s]`:
  the key logits are soft-maxed over the *tokens*, per channel i, and the query mixes the channels. A is not
  row-normalised: without LRPE a row sums to `scale · Σ_i q_t[i]`. With cosine LRPE the query has 2d channels
  and the key weight of channel c carries the feature `f_s[c]` (cos or sin of the angle of key s):
  `A[t, s] = scale · Σ_c q_t[c] · softmax_s(k[:, c mod d])[s] · f_s[c]`, which can be negative.
- Multi-scan (`polyattn.layers.lightnet.MultiScanAttention`): `A[t, s]` is the sum over the scan directions of
  the decayed weight with which `v_s` reaches `o_t`.
- Kernelized linear attention (`polyattn.layers.linear_attention.LinearAttention`):
  `A[t, s] = φ(q_t)·φ(k_s) / (Σ_s' φ(q_t)·φ(k_s') + eps)` over the keys the query sees; rows sum to 1 (less eps)
  for the positive feature maps (elu+1, ReLU, FAVOR+, Hedgehog), while cosFormer's re-weighting can be negative.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..layers.attention import Attention
from ..layers.lightnet import LightNetAttention, MultiScanAttention
from ..layers.linear_attention import LinearAttention
from ..layers.mixer_hooks import MixerCall, observe_mixer_ops

# the mixers `polyattn inspect` reads; any other layer that reports its op through `call_op` is read as well
MIXER_TYPES: tuple[type[nn.Module], ...] = (Attention, LightNetAttention, MultiScanAttention, LinearAttention)


def _one_hot_values(v: torch.Tensor) -> torch.Tensor:
    """Values `[B, S, Hv, ·]` → one-hot values `[B, S, Hv, S]` with `v_s = e_s`, in the dtype of `v`."""
    B, S, Hv = v.shape[:3]
    eye = torch.eye(S, dtype=v.dtype, device=v.device)
    return eye.view(1, S, 1, S).expand(B, S, Hv, S).contiguous()


def _map_of(call: MixerCall) -> torch.Tensor:
    """The map `[B, H, T, S]` of one op call: the op once more on one-hot values (see the module docstring)."""
    v = call.v
    with torch.no_grad():
        probe = call.again(_one_hot_values(v) if torch.is_tensor(v) else [_one_hot_values(x) for x in v])
    probe = probe[0] if isinstance(probe, tuple) else probe  # (B, T, H, S): row t of every head's map
    return probe.detach().float().permute(0, 2, 1, 3)  # (B, H, T, S)


@contextmanager
def record_attention_maps(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` fills the yielded dict: {mixer module name: map `[B, H, T, S]`}
    (float32, the last forward's), in the order the mixers first ran. See the module docstring for what a map is.

    The maps come from the mixers' hook point (`polyattn.layers.mixer_hooks`): every layer of `model` that calls
    its op through `call_op` is read, however it imported the op. Raises a `UserError` when the model has no
    token mixer this module can read (softmax, LightNet, multi-scan or linear attention), and at the end of the
    block when one of those ran without reporting its op (it would be missing from the maps without a word).
    """
    if not any(isinstance(m, MIXER_TYPES) for m in model.modules()):
        raise UserError(f"{type(model).__name__} has no softmax, LightNet, multi-scan or linear attention layer, "
                        f"so it has no attention maps to read.")
    names = {id(m): name for name, m in model.named_modules()}
    maps: dict[str, torch.Tensor] = {}
    ran: list[str] = []  # the known mixers whose forward ran

    def running(name: str, module: nn.Module, args) -> None:  # a pre-hook that returns None keeps the inputs
        if name not in ran:
            ran.append(name)

    def record(call: MixerCall) -> None:
        name = names.get(id(call.layer))
        if name is not None:  # a layer of this model (another model may run inside the block too)
            maps[name] = _map_of(call)

    with ExitStack() as stack:
        stack.enter_context(observe_mixer_ops(record))
        for name, layer in model.named_modules():
            if isinstance(layer, MIXER_TYPES):
                stack.callback(layer.register_forward_pre_hook(functools.partial(running, name)).remove)
        yield maps
    silent = [name or type(model).__name__ for name in ran if name not in maps]
    if silent:
        raise UserError(f"The mixer layer(s) {', '.join(silent)} ran without reporting their op through "
                        f"polyattn.layers.mixer_hooks.call_op, so their attention maps cannot be read; call the "
                        f"op through call_op in the layer's forward.")


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, **forward_kwargs) -> dict[str, torch.Tensor]:
    """{mixer name: map `[B, H, T, S]`} of `model(images, **forward_kwargs)` in eval mode (the mode is
    restored)."""
    was_training = model.training
    model.eval()
    try:
        with record_attention_maps(model) as maps:
            model(images, **forward_kwargs)
    finally:
        model.train(was_training)
    return dict(maps)


def attention_rank(maps: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """The attention-map rank of the iLLaMA paper (arXiv 2404.06773, the spectra of its attention maps): the
    smallest k such that the k largest singular values of a `[T, S]` map hold `threshold` of their sum.

    Args:
        maps (Tensor): `[..., T, S]`; the SVD runs in float64.
        threshold (float): fraction in (0, 1]. Default: 0.8, the paper's.

    Returns:
        Tensor: int64 `[...]`, in [1, min(T, S)]; 0 for an all-zero map. The identity `[T, T]` gives
        `ceil(threshold · T)`, a rank-1 map gives 1.
    """
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"The attention-rank threshold must be in (0, 1], got {threshold}.")
    s = torch.linalg.svdvals(maps.detach().double())  # (..., min(T, S)), descending
    total = s.sum(-1)
    fraction = s.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    reached = fraction >= threshold - 1e-9  # tolerate round-off in the running sum
    k = reached.to(torch.int64).argmax(-1) + 1  # first index that reaches the threshold, 1-based
    return torch.where(total > 0, k, torch.zeros_like(k))


@dataclass
class TokenLayout:
    """Where the patch tokens of an image classifier sit in its sequence of `T` tokens.

    Attributes:
        grid (tuple[int, int]): patch grid (rows, columns); patch tokens are in raster order.
        patches (Tensor): int64 `[N]`, indices of the patch tokens among the T.
        query (int | None): index of the class token, whose row shows what the head reads; None for models
            without one (mean-pooled), whose maps are shown as the mean over the query rows.
    """

    grid: tuple[int, int]
    patches: torch.Tensor
    query: int | None

    @property
    def num_tokens(self) -> int:
        return self.patches.numel() + (self.query is not None)


def token_layout(model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
    """The token layout of a ViT-style classifier (`patch_embed.grid_for`, `num_prefix_tokens`, and iLLaMA's
    `cls_position`) for images of `image_size` (H, W)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "grid_for"):
        raise UserError(f"{type(model).__name__} has no patch embedding, so its tokens do not map to an image grid.")
    gh, gw = patch_embed.grid_for(tuple(image_size))
    n = gh * gw
    prefix = getattr(model, "num_prefix_tokens", 0)
    if prefix == 0:
        return TokenLayout((gh, gw), torch.arange(n), None)
    if prefix != 1:
        raise UserError(f"{type(model).__name__} has {prefix} special tokens; only models with at most one class "
                        f"token have a patch-grid layout here.")
    if getattr(model, "cls_position", "first") == "last":
        return TokenLayout((gh, gw), torch.arange(n), n)
    return TokenLayout((gh, gw), torch.arange(1, n + 1), 0)


def patch_grid_map(layer_map: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """A layer's map `[B, H, T, T]` → what the model reads from each patch, `[B, rows, cols]`, heads averaged:
    the class token's row over the patch tokens, or (no class token) the mean over query rows."""
    m = layer_map.mean(1)  # (B, T, T)
    cols = layout.patches.to(m.device)
    row = m[:, layout.query, cols] if layout.query is not None else m[:, :, cols].mean(1)  # (B, N)
    return row.reshape(m.shape[0], *layout.grid)
