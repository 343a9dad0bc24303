"""The token-mixer contract (`polyattn.layers.mixer`), run over every mixer a model can be given.

Each `MixerKind` is built the one way a model builds it (`build_mixer(kind, dim, heads, causal=..., grid_shape=...)`)
and called the one way a model calls it (`mixer(x, key_padding_mask=, cache=, use_cache=, grid_shape=)`). Where
the mixer is causal: no output depends on a later token, and a prefill plus token-by-token decoding with the
returned cache equals the full forward. Padding: a padded row equals the unpadded row on its real tokens.
"""

import inspect

import pytest
import torch

from polyattn.errors import UserError
from polyattn.layers import LightNetAttention
from polyattn.layers.mixer import MixerKind, TokenMixer, build_mixer, mixer_class, mixer_options
from polyattn.testing import assert_close

D, H, GRID = 32, 4, (4, 5)
T = GRID[0] * GRID[1]


def causal_kinds() -> list[MixerKind]:
    return [k for k in MixerKind if _builds_causal(k)]


def _builds_causal(kind: MixerKind) -> bool:
    try:
        build_mixer(kind, D, H, causal=True)
    except UserError:
        return False
    return True


ON_SEQUENCES = {MixerKind.MULTISCAN: dict(directions=2)}
"""Options for 1-D sequences (no grid): the 4-direction cross-scan needs a 2-D grid."""


def mixer(kind, *, causal, seed=0, **options):
    torch.manual_seed(seed)
    if options.get("grid_shape") is None:
        options = {**ON_SEQUENCES.get(kind, {}), **options}
    return build_mixer(kind, D, H, causal=causal, **options).eval()


def x_of(B, n, seed=1):
    return torch.randn(B, n, D, generator=torch.Generator().manual_seed(seed))


def test_every_mixer_kind_names_a_class_with_the_common_call_form():
    common = ["key_padding_mask", "cache", "use_cache", "grid_shape"]
    for kind in MixerKind:
        cls = mixer_class(kind)
        assert mixer_class(kind.value) is cls and kind.layer is cls
        params = inspect.signature(cls.forward).parameters
        assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in common), kind
        assert list(params)[1] == "x", kind
    assert set(causal_kinds()) == set(MixerKind) - {MixerKind.MULTISCAN}


@pytest.mark.parametrize("kind", list(MixerKind))
@pytest.mark.parametrize("causal", [False, True])
def test_same_call_form_and_result_shape(kind, causal):
    if causal and kind not in causal_kinds():
        with pytest.raises(UserError, match="not causal"):
            build_mixer(kind, D, H, causal=True)
        return
    layer = mixer(kind, causal=causal, grid_shape=GRID)
    assert isinstance(layer, TokenMixer) and layer.causal is causal
    x = x_of(2, T)
    o, cache = layer(x, key_padding_mask=None, cache=None, use_cache=False, grid_shape=GRID)
    assert o.shape == x.shape and torch.isfinite(o).all() and cache is None
    o2, _ = layer(x, grid_shape=GRID)
    assert torch.equal(o, o2)


def test_a_mixer_without_a_decoding_state_refuses_a_cache():
    layer = mixer(MixerKind.MULTISCAN, causal=False)
    with pytest.raises(ValueError, match="no decoding state"):
        layer(x_of(1, 6), use_cache=True)


@pytest.mark.parametrize("kind", causal_kinds())
def test_causal_mixers_have_no_future_dependence(kind):
    layer = mixer(kind, causal=True)
    x = x_of(1, 24).requires_grad_()
    o, _ = layer(x)
    o[:, 9].sum().backward()
    assert (x.grad[:, 10:] == 0).all() and (x.grad[:, :10] != 0).any()


@pytest.mark.parametrize("kind", causal_kinds())
def test_causal_prefill_then_decode_equals_the_full_forward(kind):
    layer = mixer(kind, causal=True)
    x = x_of(2, 21)
    full, _ = layer(x)
    o, cache = layer(x[:, :9], use_cache=True)
    outs = [o]
    for t in range(9, 21):
        o, cache = layer(x[:, t:t + 1], cache=cache)  # passing a cache returns the next one
        outs.append(o)
    assert_close(f"{kind.value} decode", full, torch.cat(outs, 1), ratio=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", causal_kinds())
def test_causal_left_padded_prefill_and_decode_equal_the_unpadded_rows(kind):
    layer = mixer(kind, causal=True)
    x, lens, n = x_of(2, 16), [16, 11], 16
    xp = torch.randn(2, n, D) * 10
    mask = torch.zeros(2, n, dtype=torch.bool)
    for b, m in enumerate(lens):
        xp[b, n - m:], mask[b, n - m:] = x[b, :m], True
    o, cache = layer(xp, key_padding_mask=mask, use_cache=True)
    nxt = x_of(2, 1, seed=5)
    o2, _ = layer(nxt, cache=cache)
    for b, m in enumerate(lens):
        ref, _ = layer(torch.cat([x[b:b + 1, :m], nxt[b:b + 1]], 1))
        assert_close("prefill", ref[0, :m], o[b, n - m:], atol=1e-5)
        assert_close("decode", ref[0, m], o2[b, 0], atol=1e-5)


@pytest.mark.parametrize("kind", list(MixerKind))
def test_bidirectional_right_padding_equals_the_unpadded_row(kind):
    layer = mixer(kind, causal=False)
    x, m, n = x_of(2, 18), 13, 18
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, m:] = False
    xp = torch.where(mask[..., None], x, torch.full_like(x, 7.0))
    o, _ = layer(xp, key_padding_mask=mask)
    ref, _ = layer(x[1:, :m])
    assert_close(f"{kind.value} right padded", ref[0], o[1, :m], atol=1e-5)
    full, _ = layer(x[:1])
    assert_close(f"{kind.value} unpadded row", full[0], o[0], atol=1e-6)


@pytest.mark.parametrize("kind", list(MixerKind))
def test_options_that_do_not_apply_are_an_error_that_lists_the_valid_ones(kind):
    with pytest.raises(UserError, match=r"has no option 'rope_bass'.*Its options are"):
        build_mixer(kind, D, H, causal=False, rope_bass=1.0)
    cls = mixer_class(kind)
    own = inspect.signature(build_mixer).parameters  # `causal`, `grid_shape`: said once, by the model
    for name in getattr(cls, "BUILD_ARGS", ()):
        assert name not in mixer_options(cls)
        if name not in own:
            with pytest.raises(UserError, match=f"no option '{name}'"):
                build_mixer(kind, D, H, causal=False, **{name: None})
    if kind is MixerKind.SOFTMAX:
        with pytest.raises(UserError, match="no option 'mask_mode'"):
            build_mixer(kind, D, H, causal=True, mask_mode="bidirectional")


def test_string_switches_are_enums_parsed_once_with_a_sentence_listing_the_valid_values():
    with pytest.raises(UserError, match=r"Unknown gate_position 'middle'; expected one of \['pre', 'post'\]"):
        LightNetAttention(D, H, gate_position="middle")
    with pytest.raises(UserError, match=r"Unknown lrpe 'cosin'; expected one of .*Did you mean 'cosine'"):
        LightNetAttention(D, H, lrpe="cosin")
    with pytest.raises(UserError, match="Unknown normalizer_init"):
        LightNetAttention(D, H, normalizer_init="zero")
    with pytest.raises(UserError, match="Unknown init"):
        LightNetAttention(D, H, init="xavier")
    with pytest.raises(UserError, match="Unknown mixer 'lightnett'"):
        mixer_class("lightnett")
    layer = LightNetAttention(D, H, lrpe="rotary", gate_position="post", normalizer_init="unit")
    assert layer.lrpe == "rotary" and layer.gate_position == "post" and layer.normalizer_init == "unit"


def test_arguments_of_the_layer_that_cannot_apply_are_refused():
    with pytest.raises(UserError, match="lrpe=None"):
        LightNetAttention(D, H, lrpe=None, grid_shape=GRID)
    with pytest.raises(UserError, match="kernel_backend"):
        LightNetAttention(D, H, causal=False, kernel_backend="fla")
    with pytest.raises(UserError, match="not a token mixer"):
        mixer_class(torch.nn.Linear)


def test_the_lightnet_lm_passes_its_gate_options_to_lna_and_refuses_them_for_another_mixer():
    from polyattn.models.lightnet_lm import LightNetLM

    model = LightNetLM(vocab_size=11, dim=D, depth=1, num_heads=H, gate_low_rank_dim=3, gate_position="post")
    attn = model.blocks[0].attn
    assert attn.gate_position == "post" and attn.g_proj[0].out_features == 3
    assert LightNetLM(vocab_size=11, dim=D, depth=1, num_heads=H).blocks[0].attn.g_proj[0].out_features == D // H
    with pytest.raises(UserError, match="gate_low_rank_dim and gate_position belong to the LightNet mixer"):
        LightNetLM(vocab_size=11, dim=D, depth=1, num_heads=H, mixer="linear_elu", gate_low_rank_dim=3,
                   gate_position="post")
