"""Checks shared by the tests: tolerances (fast forms against references, low precision against float32) and
cached decoding step by step."""

from collections.abc import Iterator

import torch


def relative_rmse(ref: torch.Tensor, x: torch.Tensor) -> float:
    """‖ref − x‖ / ‖ref‖ over all elements, in float64."""
    ref, x = ref.detach().double(), x.detach().double()
    return ((ref - x).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, x: torch.Tensor, ratio: float = 1e-5, atol: float = 1e-6) -> None:
    """Passes when the largest absolute error is below `atol`, or else the relative RMSE is below `ratio`.

    The two-part rule (as in flash-linear-attention's tests) lets near-zero tensors pass on absolute error
    while large ones are judged relative to their size. NaN or inf anywhere fails.
    """
    assert ref.shape == x.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = (ref.detach().double() - x.detach().double()).abs().max().item()
    if err <= atol:
        return
    rel = relative_rmse(ref, x)
    assert rel <= ratio, f"{name}: max abs error {err:.3g}, relative RMSE {rel:.3g} > {ratio:g}"


def decode_in_steps(model: torch.nn.Module, tokens: torch.Tensor, prefix: int) -> Iterator[tuple[torch.Tensor, object]]:
    """Cached decoding as a sampler runs it: `model.forward_cached` over `tokens[:, :prefix]`, then over each later
    token alone with the cache so far; yields every call's `(logits, cache)`, the prefill's first."""
    logits, cache = model.forward_cached(tokens[:, :prefix])
    yield logits, cache
    for t in range(prefix, tokens.shape[1]):
        logits, cache = model.forward_cached(tokens[:, t:t + 1], cache)
        yield logits, cache
