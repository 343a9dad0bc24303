"""DiT: shapes, adaLN-Zero initialisation, conditioning, both token mixers, parameter counts."""

import math

import pytest
import torch
from einops import rearrange

import polyattn
from polyattn.layers.mixer import MixerKind
from polyattn.models.dit import DiT, timestep_embedding
from polyattn.registry import count_parameters

MIXERS = [kind.value for kind in MixerKind]  # every token mixer: DiT changes nothing else


def small_dit(mixer="softmax", **kw):
    args = dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2, mixer=mixer)
    return DiT(**{**args, **kw})


def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random values for every parameter, so the zero-initialised modulations and output layer do something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def inputs(b=3, c=3, size=8):
    return torch.randn(b, c, size, size), torch.rand(b), torch.tensor([0, 4, 5][:b])


@pytest.mark.parametrize("mixer", MIXERS)
def test_output_has_the_input_shape_and_is_exactly_zero_at_init(mixer):
    model = small_dit(mixer)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # adaLN-Zero: the final linear layer starts at zero
    assert torch.equal(model(x, t, None), torch.zeros_like(x))


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_block_starts_as_the_identity(mixer):
    model = small_dit(mixer)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c, (4, 4)), h)  # zero gates


@pytest.mark.parametrize("mixer", MIXERS)
def test_time_and_class_change_the_output_once_trained_weights_are_nonzero(mixer):
    model = perturb(small_dit(mixer)).eval()
    x, t, y = inputs()
    base = model(x, t, y)
    assert base.abs().max() > 1e-3
    assert not torch.allclose(model(x, t.flip(0), y), base, atol=1e-6)
    other = model(x, t, torch.tensor([1, 2, 3]))
    per_image = (other - base).flatten(1).abs().amax(1)
    assert (per_image > 1e-6).all()  # every image depends on its own label
    assert not torch.allclose(model(x, t, None), base, atol=1e-6)  # the null label is a label of its own
    # a scalar time broadcasts to the batch
    assert torch.allclose(model(x, torch.tensor(0.3), y), model(x, torch.full((3,), 0.3), y))


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_parameter_gets_a_gradient(mixer):
    model = perturb(small_dit(mixer))
    x, t, y = inputs()
    model(x, t, y).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_lightnet_mixer_uses_lightnet_layers_with_tpe_and_lrpe_switches():
    from polyattn.layers.lightnet import LightNetAttention, MdTpe

    model = small_dit("lightnet")
    assert isinstance(model.tpe, MdTpe) and not model.tpe.causal and model.tpe.residual
    layer = model.blocks[0].mixer.layer
    assert isinstance(layer, LightNetAttention) and not layer.causal and layer.lrpe == "cosine"
    assert layer.grid_shape == (4, 4)
    assert model.no_weight_decay() == {"tpe.q", "tpe.k", "tpe.decay_logit"}
    bare = small_dit("lightnet", use_tpe=False, lrpe=None, pos_embed="none")
    assert bare.tpe is None and bare.blocks[0].mixer.layer.lrpe is None and bare.pos_embed is None
    assert bare.no_weight_decay() == set()
    x, t, y = inputs()
    assert perturb(bare)(x, t, y).shape == x.shape
    assert small_dit("softmax").tpe is None


def test_unknown_mixer_is_refused():
    with pytest.raises(ValueError, match="Unknown mixer 'mamba'; expected one of"):
        small_dit("mamba")


@pytest.mark.parametrize("kw", [dict(lrpe="rotary"), dict(lrpe=None), dict(use_tpe=False)])
def test_lightnet_arguments_with_the_softmax_mixer_are_refused_not_ignored(kw):
    with pytest.raises(ValueError, match=r"belongs? to the LightNet mixer"):
        small_dit("softmax", **kw)


def test_checkpoint_keys_of_the_mixers_are_those_of_before():
    assert "blocks.0.mixer.layer.q_proj.weight" in small_dit("softmax").state_dict()
    assert "blocks.0.mixer.layer.g_norm.weight" in small_dit("lightnet").state_dict()


def test_unpatchify_inverts_the_raster_patch_layout():
    model = small_dit()
    x = torch.randn(2, 3, 8, 8)
    tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=2, q=2)  # token k = patch (k // 4, k % 4)
    assert torch.equal(model.unpatchify(tokens, (4, 4)), x)


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_final_layer_output_of_a_token_lands_on_its_own_patch(mixer):
    model = small_dit(mixer)
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(12.0))  # the p·p·C values of every token
    out = model(*inputs(b=1))
    assert torch.equal(out[0, :, :2, :2], rearrange(torch.arange(12.0), "(p q c) -> c p q", p=2, q=2, c=3))


@pytest.mark.parametrize("mixer", MIXERS)
def test_another_resolution_is_accepted(mixer):
    model = perturb(small_dit(mixer)).eval()
    x = torch.randn(2, 3, 12, 16)
    assert model(x, torch.rand(2), torch.tensor([0, 1])).shape == x.shape


def test_timestep_embedding_is_dits_formula():
    t = torch.tensor([0.0, 17.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-5)


def test_parameter_counts_match_dit():
    # DiT-XL/2 in DiT's latent setting (32x32x4 inputs, learned variance → 8 output channels, 1000 classes): the
    # published 675,129,632 less the frozen 256-token position table, which is a buffer here.
    latent = dict(in_chans=4, out_chans=8, num_classes=1000, img_size=32, patch_size=2)
    assert count_parameters("dit_xl", **latent) == 675_129_632 - 256 * 1152
    names = polyattn.list_models("diffusion")
    assert {"dit_nano", "dit_tiny", "dit_small", "dit_base"} <= set(names)


@pytest.mark.parametrize("mixer", ["softmax", "lightnet"])  # the two the docstring's table counts
def test_parameter_count_formula(mixer):
    D, L, P, C, K, H = 32, 2, 2, 3, 5, 2
    h = 4 * D
    per_block = 2 * D * h + h + D + 6 * D * D + 6 * D
    per_block += 4 * D * D + 4 * D if mixer == "softmax" else 4 * D * D + 2 * D * (D // H) + D
    total = (P * P * C * D + D) + (256 * D + D + D * D + D) + (K + 1) * D + L * per_block
    total += 2 * D * D + 2 * D + D * P * P * C + P * P * C
    if mixer == "lightnet":
        total += 2 * (D * D + 3 * D + H)
    assert sum(p.numel() for p in small_dit(mixer).parameters()) == total
