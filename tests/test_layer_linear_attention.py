"""`LinearAttention` beyond the mixer contract (tests/test_token_mixers.py): the fast form against the float64
reference through the layer, Performer's redraw, the learnable map, options of one feature map refused by another."""

import pytest
import torch

from polyattn.errors import UserError
from polyattn.layers import LinearAttention
from polyattn.ops.linear_attn import FeatureMap

D, H = 32, 4


@pytest.mark.parametrize("kind", list(FeatureMap))
def test_state_size_counts_every_cached_tensor(kind):
    layer = LinearAttention(D, H, feature_map=kind)
    _, cache = layer(torch.randn(1, 3, D), use_cache=True)
    assert layer.state_size() == cache.S[0].numel() + cache.z[0].numel() + cache.offset[0].numel()


def test_performer_redraw_changes_the_features_and_only_when_asked():
    torch.manual_seed(0)
    layer = LinearAttention(D, H, feature_map="favor", num_features=16, causal=False).eval()
    x = torch.randn(2, 9, D)
    before = layer(x)[0]
    assert torch.equal(before, layer(x)[0])  # forward never redraws
    layer.redraw_features(torch.Generator().manual_seed(1))
    assert not torch.allclose(before, layer(x)[0])
    assert "projection" in layer.state_dict()  # saved, so a checkpoint decodes with its own features
    with pytest.raises(UserError, match="only the 'favor' feature map"):
        LinearAttention(D, H).redraw_features()


def test_hedgehog_map_is_learned():
    layer = LinearAttention(D, H, feature_map="hedgehog", num_features=6)
    layer(torch.randn(2, 5, D))[0].pow(2).sum().backward()
    assert layer.projection.shape == (H, D // H, 6) and layer.projection.grad.abs().sum() > 0


def test_options_of_another_feature_map_are_refused():
    with pytest.raises(UserError, match="num_features sizes"):
        LinearAttention(D, H, feature_map="elu", num_features=8)
    with pytest.raises(UserError, match="max_len is cosFormer's horizon"):
        LinearAttention(D, H, feature_map="relu", max_len=100)
    with pytest.raises(UserError, match="Unknown feature_map 'elu1'"):
        LinearAttention(D, H, feature_map="elu1")
