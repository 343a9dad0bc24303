"""The model contract, checked over every registered model (timm's generic-test pattern)."""

import pytest
import torch

import polyattn
from polyattn.registry import get_entry

CLASSIFIERS = polyattn.list_models("classification")


def small_classifier(name: str, num_classes: int = 7):
    """The variant at a test size: 32 px images, 2 blocks, its own width."""
    params = get_entry(name).parameters()
    overrides = {"img_size": 32, "num_classes": num_classes}
    if "patch_size" in params:
        overrides["patch_size"] = 8
    if "depth" in params:
        overrides["depth"] = 2
    return polyattn.create_model(name, **overrides)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_contract(name):
    torch.manual_seed(0)
    model = small_classifier(name)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"

    tokens = model.forward_features(x)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[-1] == model.num_features
    pooled = model.forward_head(tokens, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(tokens), logits, atol=1e-5)

    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    assert isinstance(model.no_weight_decay(), set)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_accepts_another_resolution(name):
    model = small_classifier(name).eval()
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)


CAUSAL_LMS = polyattn.list_models("causal_lm")


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_causal_lm_contract(name):
    """Every causal LM at a tiny size: logits [B, T, V], (logits, loss) with targets, a gradient for every
    parameter, and the shared decoding API (`forward_cached`, `generate`)."""
    torch.manual_seed(0)
    params = get_entry(name).parameters()
    overrides = {k: v for k, v in dict(vocab_size=37, dim=32, depth=2, num_heads=2).items() if k in params}
    model = polyattn.create_model(name, **overrides)
    x = torch.randint(0, 37, (2, 11))
    logits = model(x)
    assert logits.shape == (2, 11, 37) and torch.isfinite(logits).all()
    logits, loss = model(x, torch.roll(x, -1, 1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    (loss + logits.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"
    step_logits, cache = model.eval().forward_cached(x[:, :5])
    assert step_logits.shape == (2, 5, 37) and cache is not None
    assert model.generate(x[:, :3], 4).shape == (2, 7)


def test_reset_classifier_switches_pooling_and_rejects_unknown_modes():
    vit = small_classifier("vit_nano")
    vit.reset_classifier(5, global_pool="avg")
    assert vit.global_pool == "avg" and vit(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    vit.reset_classifier(0)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, vit.num_features)
    for name in ("vit_nano", "illama_nano", "lightnet_vision_nano"):
        with pytest.raises(ValueError, match="pools with"):
            small_classifier(name).reset_classifier(3, global_pool="max")
