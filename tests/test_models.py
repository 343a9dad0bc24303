"""The model contract, checked over every registered model (timm's generic-test pattern)."""

import pytest
import torch

import polyattn
from polyattn.registry import get_entry

CLASSIFIERS = polyattn.list_models("classification")


def small_classifier(name: str, num_classes: int = 7, **options):
    """The variant at a test size: 32 px images, 2 blocks, its own width (and `options`)."""
    params = get_entry(name).parameters()
    overrides = {"img_size": 32, "num_classes": num_classes, **options}
    if "patch_size" in params:
        overrides["patch_size"] = 8
    if "depth" in params:
        overrides["depth"] = 2
    return polyattn.create_model(name, **overrides)


# one model per class that takes a patch stem, run with the convolutional one (patch 8: three stride-2 convolutions)
STEMMED = sorted({get_entry(n).cls: n for n in CLASSIFIERS if "stem" in get_entry(n).parameters()}.values())


@pytest.mark.parametrize("name, options", [(n, {}) for n in CLASSIFIERS]
                         + [(n, {"stem": stem}) for n in STEMMED for stem in ("conv", "resnet")])
def test_classifier_contract(name, options):
    torch.manual_seed(0)
    model = small_classifier(name, **options)
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


@pytest.mark.parametrize("name, options", [(n, {}) for n in CLASSIFIERS]
                         + [(n, {"stem": stem}) for n in STEMMED for stem in ("conv", "resnet")])
def test_classifier_accepts_another_resolution(name, options):
    model = small_classifier(name, **options).eval()
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


MASKED_LMS = polyattn.list_models("masked_lm")


@pytest.mark.parametrize("name", MASKED_LMS)
def test_masked_lm_contract(name):
    """Every masked LM at a tiny size: logits [B, T, V], (logits, loss) with targets on masked positions only, a
    padding mask, a gradient for every parameter, `[MASK]` = the last id, and no generation API."""
    torch.manual_seed(0)
    params = get_entry(name).parameters()
    overrides = {k: v for k, v in dict(vocab_size=37, dim=32, depth=2, num_heads=2).items() if k in params}
    model = polyattn.create_model(name, **overrides)
    assert model.mask_token_id == 36
    x = torch.randint(0, 36, (2, 11))
    targets = torch.full_like(x, -100)
    targets[:, 3] = x[:, 3]
    x[:, 3] = model.mask_token_id
    logits = model(x)
    assert logits.shape == (2, 11, 37) and torch.isfinite(logits).all()
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    logits, loss = model(x, targets, attention_mask=mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    (loss + logits.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"
    assert not hasattr(model, "generate") and not hasattr(model, "forward_cached")


DIFFUSION_MODELS = polyattn.list_models("diffusion")


@pytest.mark.parametrize("name", DIFFUSION_MODELS)
def test_diffusion_model_contract(name):
    """Every diffusion model at a tiny depth: `model(x, t, y)` has the shape of x, is exactly 0 at init (adaLN-Zero),
    accepts the null label (`y=None` or `num_classes`), and once its zero-initialised layers are perturbed every
    parameter gets a gradient."""
    torch.manual_seed(0)
    model = polyattn.create_model(name, img_size=16, patch_size=4, in_chans=3, num_classes=5, depth=2)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 5])
    out = model(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    assert model(x, t).shape == x.shape
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = model(x, t, y)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"
    assert isinstance(model.no_weight_decay(), set)


def test_reset_classifier_switches_pooling_and_rejects_unknown_modes():
    vit = small_classifier("vit_nano")
    vit.reset_classifier(5, global_pool="avg")
    assert vit.global_pool == "avg" and vit(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    vit.reset_classifier(0)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, vit.num_features)
    for name in ("vit_nano", "illama_nano", "lightnet_vision_nano"):
        with pytest.raises(ValueError, match="pools with"):
            small_classifier(name).reset_classifier(3, global_pool="max")
