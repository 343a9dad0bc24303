"""Reversible stacks (RevNet coupling, arXiv 1707.04585 / 2302.04869): the recomputing backward equals the ordinary
backward of the same coupled network in float64, dropout and drop path included (their random state replayed), and
the activations kept for backward do not grow with depth."""

import pytest
import torch
from torch import nn

from polyattn.layers import Attention, LightNetAttention, LightNetBlock, Mlp, TransformerBlock
from polyattn.layers.reversible import reversible_blocks
from polyattn.testing import assert_close

D = 16


def vit_blocks(depth, drop_path=0.0, drop=0.0):
    return nn.ModuleList(
        TransformerBlock(D, attn=Attention(D, 2, mask_mode="causal", attn_drop=drop), mlp=Mlp(D, 2 * D, drop=drop),
                         norm_layer=nn.LayerNorm, drop_path=drop_path)
        for _ in range(depth))


def grads(blocks, x, recompute, seed, **kwargs):
    torch.manual_seed(seed)
    blocks.zero_grad()
    x = x.clone().requires_grad_()
    y = reversible_blocks(blocks, x, recompute=recompute, **kwargs)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in blocks.parameters()]


@pytest.mark.parametrize("drop_path, drop", [(0.0, 0.0), (0.3, 0.2)], ids=["plain", "dropout+drop-path"])
def test_recomputed_backward_equals_ordinary_backward_float64(drop_path, drop):
    torch.manual_seed(0)
    blocks = vit_blocks(4, drop_path, drop).double().train()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    ref = grads(blocks, x, recompute=False, seed=5)
    out = grads(blocks, x, recompute=True, seed=5)
    names = ["y", "dx"] + [n for n, _ in blocks.named_parameters()]
    for name, r, o in zip(names, ref, out):
        assert_close(name, r, o, atol=1e-11, ratio=1e-10)
    if drop_path:  # the masks are drawn: another seed gives other gradients (the replay is what makes them equal)
        other = grads(blocks, x, recompute=True, seed=6)
        assert not torch.allclose(other[1], ref[1])


def test_lightnet_blocks_and_tensor_arguments_get_their_gradients():
    """LightNet blocks, with a keyword tensor reaching every branch (here the key padding mask, and a learned
    tensor through a custom block) through the recomputing backward."""
    torch.manual_seed(1)
    blocks = nn.ModuleList(LightNetBlock(D, LightNetAttention(D, 2, causal=True, lrpe=None), drop_path=0.2)
                           for _ in range(3)).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    ref = grads(blocks, x, recompute=False, seed=2, key_padding_mask=mask)
    out = grads(blocks, x, recompute=True, seed=2, key_padding_mask=mask)
    for r, o in zip(ref, out):
        assert_close("lightnet", r, o, atol=1e-11, ratio=1e-10)

    class Scaled(nn.Module):  # both branches read a tensor argument that needs its gradient
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D).double()

        def mixer_branch(self, x, c):
            return torch.tanh(self.lin(x)) * c, None

        def mlp_branch(self, x, c):
            return torch.sin(x) * c

    stack = [Scaled(), Scaled()]
    c = torch.randn(2, 1, D, dtype=torch.float64)
    results = []
    for recompute in (False, True):
        cl, xl = c.clone().requires_grad_(), x.clone().requires_grad_()
        reversible_blocks(stack, xl, recompute=recompute, c=cl).square().sum().backward()
        results.append((xl.grad, cl.grad))
        for b in stack:
            b.zero_grad()
    assert_close("dx", results[0][0], results[1][0], atol=1e-11)
    assert_close("dc", results[0][1], results[1][1], atol=1e-11)


def saved_bytes(depth, recompute=True):
    from polyattn.bench.common import SavedTensorBytes

    torch.manual_seed(0)
    blocks = vit_blocks(depth)
    x = torch.randn(2, 16, D, requires_grad=True)
    with SavedTensorBytes() as saved:
        y = reversible_blocks(blocks, x, recompute=recompute)
    y.sum().backward()
    assert all(p.grad is not None for p in blocks.parameters())
    return saved.bytes


def test_saved_activations_do_not_grow_with_depth():
    assert saved_bytes(2) == saved_bytes(8)
    assert saved_bytes(8, recompute=False) > 3 * saved_bytes(2, recompute=False)  # what ordinary backward keeps


def test_blocks_learn_when_their_input_needs_no_gradient():
    """A frozen embedding below the stack: nothing entering the function needs a gradient, the blocks still do."""
    torch.manual_seed(0)
    blocks = vit_blocks(2).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)  # requires_grad=False
    reversible_blocks(blocks, x).sum().backward()
    got = [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad()
    reversible_blocks(blocks, x, recompute=False).sum().backward()
    for p, g in zip(blocks.parameters(), got):
        assert_close("param", p.grad, g, atol=1e-12)


def test_inference_runs_the_same_coupling_without_the_function():
    torch.manual_seed(0)
    blocks = vit_blocks(3).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        a = reversible_blocks(blocks, x)
    b = reversible_blocks(blocks, x.requires_grad_(), recompute=True)
    assert_close("eval", a, b.detach(), atol=1e-6)


@pytest.mark.parametrize("name, kwargs", [
    ("vit_nano", {"drop_path_rate": 0.2}),
    ("illama_nano", {"mask_mode": "illama_soft", "drop_path_rate": 0.2}),
    ("lightnet_vision_nano", {"drop_path_rate": 0.2}),
    ("multiscan_vision_nano", {}),
])
def test_reversible_vision_models_train_as_their_coupled_network(name, kwargs, monkeypatch):
    """`reversible=True`: the model's gradients (float64, training mode, drop path on) equal those of the same
    coupled network under ordinary backward; the weights are the standard model's (same state-dict keys)."""
    import functools

    from polyattn.layers import reversible
    from polyattn.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, img_size=16, patch_size=4, num_classes=3, depth=3, reversible=True, **kwargs).double()
    assert model.state_dict().keys() == create_model(name, img_size=16, patch_size=4, num_classes=3, depth=3,
                                                     **kwargs).state_dict().keys()
    with torch.no_grad():  # away from the initialisation's exact zeros (class token, zero-initialised layers), where
        for p in model.parameters():  # a norm of an all-zero token turns a 1e-16 reconstruction error into 1e-10
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    extra = {"soft_mask_a": 0.4} if name == "illama_nano" else {}

    def run():
        torch.manual_seed(3)
        model.zero_grad()
        model(x, **extra).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out = run()
    monkeypatch.setattr(reversible, "reversible_blocks",
                        functools.partial(reversible.reversible_blocks, recompute=False))
    ref = run()
    assert out.keys() == ref.keys() and any("blocks.2" in n for n in out)
    for n in ref:
        assert_close(n, ref[n], out[n], atol=1e-10, ratio=1e-9)


def _perturbed(model):
    with torch.no_grad():  # away from the initialisation's exact zeros (zero-initialised gates and heads)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _model_grads_match(model, loss_of, monkeypatch, atol=1e-10, ratio=1e-9):
    import functools

    from polyattn.layers import reversible

    def run():
        torch.manual_seed(3)
        model.zero_grad()
        loss_of(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out = run()
    with monkeypatch.context() as m:
        m.setattr(reversible, "reversible_blocks", functools.partial(reversible.reversible_blocks, recompute=False))
        ref = run()
    assert out.keys() == ref.keys() and len(out) > 0
    for n in ref:
        assert_close(n, ref[n], out[n], atol=atol, ratio=ratio)


@pytest.mark.parametrize("name, kwargs", [("llama_lm_nano", {"dropout": 0.1}), ("lightnet_lm_nano", {})])
def test_reversible_language_models(name, kwargs, monkeypatch):
    """Gradients as the coupled network's ordinary backward; no future dependence; cached decoding (prefill, then
    token by token) equals the full forward."""
    from polyattn.registry import create_model

    torch.manual_seed(0)
    model = _perturbed(create_model(name, vocab_size=37, depth=3, reversible=True, **kwargs).double())
    tokens = torch.randint(0, 37, (2, 11))
    _model_grads_match(model.train(), lambda m: m(tokens, tokens)[1], monkeypatch)
    model.eval()
    with torch.no_grad():
        full = model(tokens)
        changed = tokens.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 37
        assert_close("no future dependence", full[:, :7], model(changed)[:, :7], atol=1e-12)
        logits, cache = model.forward_cached(tokens[:, :6])
        steps = [logits]
        for t in range(6, 11):
            logits, cache = model.forward_cached(tokens[:, t:t + 1], cache)
            steps.append(logits)
        assert_close("cached == full", full, torch.cat(steps, 1), atol=1e-10)
        assert not torch.allclose(full, create_model(name, vocab_size=37, depth=3, **kwargs).double().eval()(tokens))


@pytest.mark.parametrize("mixer", ["softmax", "lightnet"])
def test_reversible_dit_gets_the_conditioning_gradient(mixer, monkeypatch):
    """DiT's conditioning `c` reaches both branches of every block: through the recomputing backward the time
    and class embeddings get the gradients of the ordinary backward."""
    from polyattn.registry import create_model

    torch.manual_seed(0)
    model = _perturbed(create_model("dit_nano", img_size=8, patch_size=2, num_classes=3, depth=3, mixer=mixer,
                                    reversible=True).double()).train()
    x, t, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([0, 2])
    _model_grads_match(model, lambda m: m(x, t, y).square().sum(), monkeypatch)
    model.zero_grad()
    model(x, t, y).square().sum().backward()
    assert model.t_embedder.mlp[0].weight.grad.abs().sum() > 0 and model.y_embedder.weight.grad.abs().sum() > 0
