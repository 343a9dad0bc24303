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
