"""DiT's three conditionings (arXiv 2212.09748 §3.2): adaLN-Zero, cross-attention to condition tokens, in-context
tokens; the cross-attention conditioning's class keys/values computed once and reused by every sampler step."""

import pytest
import torch

import polyattn
from polyattn.models.dit import DiT, DiTTokenBlock
from polyattn.tasks.diffusion import sample

MIXERS = ["softmax", "lightnet"]
CONDITIONINGS = ["adaln_zero", "cross_attention", "in_context"]


def small_dit(mixer="softmax", conditioning="cross_attention", **kw):
    torch.manual_seed(0)
    args = dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                mixer=mixer, conditioning=conditioning)
    return DiT(**{**args, **kw})


def perturb(model, std=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def inputs(b=3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 3, 8, 8, generator=g), torch.rand(b, generator=g), torch.tensor([0, 4, 5][:b])


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_conditioning_starts_at_zero_and_then_depends_on_time_and_class(mixer, conditioning):
    model = small_dit(mixer, conditioning)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # the final linear layer starts at zero
    model = perturb(model)
    base = model(x, t, y)
    assert base.shape == x.shape
    assert not torch.allclose(model(x, t.flip(0), y), base, atol=1e-6)
    other = model(x, t, torch.tensor([1, 2, 3]))
    assert ((other - base).flatten(1).abs().amax(1) > 1e-6).all()  # every image depends on its own label
    model.train()
    model(x, t, y).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_the_conditionings_build_the_blocks_the_paper_compares():
    assert all(isinstance(b, DiTTokenBlock) and b.cross is not None for b in small_dit().blocks)
    assert all(isinstance(b, DiTTokenBlock) and b.cross is None for b in small_dit(conditioning="in_context").blocks)
    assert small_dit(conditioning="adaln_zero").final_layer.adaLN_modulation is not None
    lightnet = small_dit("lightnet", "in_context")
    assert lightnet.blocks[0].mixer.layer.num_special == 2  # the condition tokens get LRPE angle 0
    with pytest.raises(ValueError, match="Unknown conditioning 'film'; expected one of"):
        small_dit(conditioning="film")
    assert polyattn.create_model("dit_nano", conditioning="in_context").conditioning.value == "in_context"


@pytest.mark.parametrize("mixer", MIXERS)
def test_an_encoded_condition_reused_across_steps_equals_recomputing_it(mixer):
    model = perturb(small_dit(mixer))
    x, _, y = inputs()
    condition = model.encode_condition(y)
    for t in (0.9, 0.5, 0.1):  # one encoding serves every step
        tt = torch.full((3,), t)
        torch.testing.assert_close(model(x, tt, condition=condition), model(x, tt, y), atol=1e-6, rtol=1e-5)
    null = model.encode_condition(None, batch_size=3)
    torch.testing.assert_close(model(x, torch.full((3,), 0.5), condition=null), model(x, torch.full((3,), 0.5)),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(x, torch.full((3,), 0.5), y, condition=condition)
    assert small_dit(conditioning="in_context").encode_condition(y) is None  # nothing image-independent to reuse


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sampling_with_the_reused_condition_equals_sampling_that_recomputes_it(cfg):
    model = perturb(small_dit())
    calls, encoded = [], []
    encode = model.encode_condition
    model.encode_condition = lambda y: (encoded.append(len(y)), encode(y))[1]
    model.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(a[1].k.shape[0]))
    labels = torch.tensor([0, 3])
    kw = dict(shape=(3, 8, 8), null_label=5, steps=4, cfg=cfg, progress=False)
    reused = sample(model, labels, generator=torch.Generator().manual_seed(0), **kw)
    assert encoded == [2 if cfg == 1.0 else 4]  # once for the batch: every step and both guidance branches
    recomputed = sample(lambda x, t, y: model(x, t, y), labels, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=1e-5)
    assert len(encoded) == 1 + 4  # recomputing: once more per step
    assert set(calls) == {2 if cfg == 1.0 else 4}


def test_the_sampling_measure_times_the_reused_condition_against_recomputing_it():
    from polyattn.bench.sample_quality import condition_reuse_seconds

    model = perturb(small_dit())
    encoded = []
    encode = model.encode_condition
    model.encode_condition = lambda y: (encoded.append(len(y)), encode(y))[1]
    out = condition_reuse_seconds(model, [0, 3, 4], steps=3, cfg=2.0, sampler="euler", batch=2, repeats=2)
    assert out["images"] == 2 and out["repeats"] == 2
    assert out["reused_seconds_per_image"] > 0 and out["recomputed_seconds_per_image"] > 0
    assert out["saving"] == pytest.approx(1 - out["reused_seconds_per_image"] / out["recomputed_seconds_per_image"])
    # reused: one encoding per run; recomputed: one per step, inside the model
    assert encoded.count(4) == 2 + 2 * 3
