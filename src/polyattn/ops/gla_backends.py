"""Kernel backends for gated linear attention: the seam where the causal LightNet core may run on an external
kernel instead of polyattn's chunked PyTorch form, which stays the reference and the default.

A backend is `f(q, k, v, g, initial_state) -> (o, final_state)` on `[B, T, H, K]` tensors (`v [B, T, H, V]`):

    S_t = diag(exp(g_t)) S_{t−1} + k_t v_tᵀ,    o_t = q_tᵀ S_t     (scale 1; g ≤ 0 per-step log-decays)

with a float32 state `[B, H, K, V]`. Causal LightNet is exactly this with its normalised key weights as `k` and
`g_t = z_{t−1} − z_t` (`polyattn.ops.lightnet`): flash-linear-attention's own LightNet layer sits on its GLA kernel
the same way.

Backends:
- "fla": flash-linear-attention's `chunk_gla` (Triton kernels; CUDA only), optional (`pip install
  flash-linear-attention`). Bound on first use, and only for CUDA tensors; nothing else depends on it.

`register_backend` adds one (the tests register a plain recurrent loop to check the LightNet mapping on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GLABackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                      tuple[torch.Tensor, torch.Tensor]]
_BACKENDS: dict[str, GLABackend] = {}


def register_backend(name: str, fn: GLABackend) -> None:
    """Makes `fn` selectable as `backend=name` of the causal LightNet op."""
    _BACKENDS[name] = fn


def get_backend(name: str, device: torch.device) -> GLABackend:
    """The backend `name` for tensors on `device`, or a ValueError saying why it cannot run there."""
    if name == "fla" and "fla" not in _BACKENDS:
        if device.type != "cuda":
            raise ValueError("backend 'fla' (flash-linear-attention's Triton kernels) runs on CUDA tensors only; "
                             "use backend='torch' on this device.")
        try:
            from fla.ops.gla import chunk_gla
        except ImportError as err:
            raise ValueError("backend 'fla' needs flash-linear-attention (`pip install flash-linear-attention`); "
                             "use backend='torch' without it.") from err

        def fla_chunk_gla(q, k, v, g, initial_state):
            return chunk_gla(q=q, k=k, v=v, g=g, scale=1.0, initial_state=initial_state, output_final_state=True)

        register_backend("fla", fla_chunk_gla)
    if name not in _BACKENDS:
        known = ", ".join(["torch", "fla", *sorted(set(_BACKENDS) - {"fla"})])
        raise ValueError(f"unknown gated-linear-attention backend {name!r}; known: {known}")
    return _BACKENDS[name]


__all__ = ["GLABackend", "get_backend", "register_backend"]
