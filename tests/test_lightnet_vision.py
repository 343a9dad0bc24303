"""LightNet-vision (arXiv 2405.21022) and the multiplicative multi-scan baseline: model-level contracts.

Operator and layer checks (global form == final causal state, MD-LRPE relativity, MD-TPE sums, order
independence of one layer) are in test_ops_lightnet.py, test_ops_lrpe_tpe.py and test_layer_lightnet.py.
"""

import math

import pytest
import torch
from torch.export import Dim

import polyattn
from polyattn.models.lightnet_vision import LightNetViT, MultiScanViT
from polyattn.registry import count_parameters
from polyattn.train.optim import param_groups

SMALL = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2)


def lightnet(**kw) -> LightNetViT:
    return LightNetViT(**{**SMALL, **kw})


def multiscan(**kw) -> MultiScanViT:
    return MultiScanViT(**{**SMALL, **kw})


def permute_patches(x: torch.Tensor, perm: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Moves raster patch `perm[i]` of `x` to slot `i`: the patch tokens come out permuted by `perm`."""
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    p = x.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)
    p = p[:, perm]
    return p.reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def expected_params(D, H, L, P, C, *, tpe, mixer="lightnet", decay_projs=1, hidden=None):
    """The documented formula (LightNetViT / MultiScanViT docstrings)."""
    h = hidden or 8 * math.ceil(D / 3)
    r = D // H
    block = 4 * D * D + 2 * D * r + D + 2 * D + 3 * D * h
    if mixer == "multiscan":
        block += decay_projs * (2 * D * r + D)
    total = 3 * P * P * D + D + L * block + D + D * C + C
    return total + (2 * (D * D + 3 * D + H) if tpe else 0)


@pytest.mark.parametrize("build", [
    lambda: lightnet(),
    lambda: lightnet(lrpe="rotary", tpe_direction="causal", tpe_residual=False),
    lambda: multiscan(directions=2),
    lambda: multiscan(directions=4, use_tpe=True, per_direction_decay=True),
], ids=["lightnet", "lightnet-rotary-causal-tpe", "multiscan2", "multiscan4-tpe-per-direction"])
def test_forward_backward_every_parameter_gets_gradient(build):
    model = build()
    x = torch.randn(2, 3, 16, 16)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 32)  # 4x4 patches, no class token
    logits = model.forward_head(tokens)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"parameters without gradient: {missing}"


def test_position_blind_without_tpe_and_lrpe():
    # Spec §1.3: the global additive mixer is a reduction over tokens, so without MD-TPE and MD-LRPE the model
    # is permutation-equivariant in its tokens and the pooled features are invariant.
    model = lightnet(use_tpe=False, lrpe=None).eval()
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16)
    y = permute_patches(x, perm)
    tx, ty = model.forward_features(x), model.forward_features(y)
    torch.testing.assert_close(ty, tx[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.forward_head(ty, pre_logits=True), model.forward_head(tx, pre_logits=True),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [
    lambda: lightnet(),
    lambda: lightnet(use_tpe=True, lrpe=None),
    lambda: lightnet(use_tpe=False, lrpe="cosine"),
    lambda: lightnet(use_tpe=False, lrpe="rotary"),
    lambda: multiscan(directions=4),
], ids=["tpe+lrpe", "tpe", "lrpe-cosine", "lrpe-rotary", "multiscan4"])
def test_positions_break_permutation_invariance(build):
    model = build().eval()
    x = torch.randn(2, 3, 16, 16)
    y = permute_patches(x, torch.randperm(16))
    diff = (model.forward_head(model.forward_features(x), pre_logits=True)
            - model.forward_head(model.forward_features(y), pre_logits=True)).abs().max()
    assert diff > 1e-4


def test_permute_patches_helper():
    x = torch.randn(1, 3, 16, 16)
    perm = torch.randperm(16)
    model = lightnet()
    torch.testing.assert_close(model.patch_embed(permute_patches(x, perm)), model.patch_embed(x)[:, perm])


@pytest.mark.parametrize("cls", [LightNetViT, MultiScanViT])
def test_another_resolution(cls):
    # Nothing depends on the build resolution: the grid comes from the input, and weights move between sizes.
    small = cls(**{**SMALL, "img_size": 32}).eval()
    large = cls(**{**SMALL, "img_size": 48}).eval()
    large.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(small(x), large(x), atol=1e-6, rtol=1e-6)
    assert small(torch.randn(2, 3, 32, 48)).shape == (2, 5)  # non-square grid (8 x 12)


def test_parameter_count_formula():
    D, H, L, P, C = 48, 3, 2, 4, 7
    kw = dict(img_size=16, patch_size=P, num_classes=C, embed_dim=D, depth=L, num_heads=H)
    cases = [
        (LightNetViT(**kw), dict(tpe=True)),
        (LightNetViT(**kw, use_tpe=False, lrpe=None), dict(tpe=False)),
        (LightNetViT(**kw, mlp_hidden_dim=100), dict(tpe=True, hidden=100)),
        (MultiScanViT(**kw, directions=2), dict(tpe=False, mixer="multiscan")),
        (MultiScanViT(**kw, directions=4, use_tpe=True), dict(tpe=True, mixer="multiscan")),
        (MultiScanViT(**kw, directions=4, per_direction_decay=True), dict(tpe=False, mixer="multiscan",
                                                                           decay_projs=4)),
    ]
    for model, spec in cases:
        assert sum(p.numel() for p in model.parameters()) == expected_params(D, H, L, P, C, **spec)


@pytest.mark.parametrize("size, D, H, L", [("nano", 128, 4, 6), ("tiny", 192, 3, 12), ("small", 384, 6, 12),
                                           ("base", 768, 12, 12)])
def test_registered_sizes(size, D, H, L):
    assert count_parameters(f"lightnet_vision_{size}") == expected_params(D, H, L, 16, 1000, tpe=True)
    assert count_parameters(f"multiscan_vision_{size}") == expected_params(D, H, L, 16, 1000, tpe=False,
                                                                          mixer="multiscan")
    assert count_parameters("lightnet_vision_tiny") == 6_025_966  # the docstring's example


def test_two_and_four_scans_have_equal_parameters():
    # The decay projection is shared by the directions by default: 2- vs 4-scan differ in compute only.
    assert count_parameters("multiscan_vision_tiny", directions=2) == count_parameters("multiscan_vision_tiny")
    D, r, L = 192, 64, 12
    per_dir = count_parameters("multiscan_vision_tiny", per_direction_decay=True)
    assert per_dir - count_parameters("multiscan_vision_tiny") == L * 3 * (2 * D * r + D)
    with torch.device("meta"):
        assert polyattn.create_model("multiscan_vision_tiny").blocks[0].attn.directions == 4


def test_weight_decay_exclusions():
    model = lightnet()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"tpe.q", "tpe.k", "tpe.decay_logit"} <= names.keys()
    groups = param_groups(model, weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(names[n]) in no_decay for n in model.no_weight_decay())
    assert id(names["blocks.0.attn.q_proj.weight"]) not in no_decay
    assert lightnet(use_tpe=False).no_weight_decay() == set()


def test_torch_export():
    model = lightnet().eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    x3 = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(program.module()(x3), model(x3), atol=1e-6, rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="lrpe"):
        lightnet(lrpe="sincos")
    with pytest.raises(ValueError, match="directions"):
        multiscan(directions=3)
    with pytest.raises(ValueError, match="tpe_direction"):
        lightnet(tpe_direction="forward")


LINEAR_MIXERS = ["linear_elu", "linear_relu", "performer", "cosformer", "hedgehog"]


@pytest.mark.parametrize("mixer", LINEAR_MIXERS)
def test_kernelized_linear_attention_as_the_mixer_trains_every_parameter(mixer):
    model = lightnet(mixer=mixer)
    x = torch.randn(2, 3, 16, 16)
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # MD-TPE gives the mixer its positions: permuting the patches changes the prediction
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert not torch.allclose(model(permute_patches(x, perm)), model(x), atol=1e-5)


def test_lightnet_options_with_another_mixer_are_refused():
    with pytest.raises(ValueError, match="lrpe and scale belong to the LightNet mixer"):
        lightnet(mixer="performer", lrpe="rotary", scale=None)
