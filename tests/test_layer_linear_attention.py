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


def test_training_redraws_performer_features_on_schedule_in_the_model_and_its_average(tmp_path):
    from safetensors.torch import load_file

    from polyattn.layers import redraw_random_features
    from polyattn.train.config import build_config
    from polyattn.train.loop import train

    tiny = ["model=linear_lm_nano", "model.mixer=performer", "model.dim=32", "model.depth=2", "model.num_heads=2",
            "data.seq_len=16", "train.batch_size=4", "data.eval_batch_size=8", "data.eval_tokens=64",
            "train.progress=false", "train.precision=fp32", "train.ema_decay=0.9", f"train.out_dir={tmp_path}"]

    def projections(run):
        return {k: v for k, v in load_file(tmp_path / run / "model.safetensors").items() if k.endswith("projection")}

    train(build_config("llama_lm_shakespeare", [*tiny, "train.max_steps=3", "train.run_name=fixed"]),
          evaluate=False)
    train(build_config("llama_lm_shakespeare", [*tiny, "train.max_steps=3", "train.run_name=redrawn",
                                               "train.feature_redraw_every=2"]), evaluate=False)
    fixed, redrawn = projections("fixed"), projections("redrawn")
    assert len(fixed) == 2 and all(not torch.equal(fixed[k], redrawn[k]) for k in fixed)
    # the features are step 2's draw (seed 0): what redraw_random_features gives any copy of the model
    from polyattn.train.loop import load_run_model

    model, _ = load_run_model(tmp_path / "fixed")
    assert redraw_random_features(model, 0 * 1_000_003 + 2) == 2
    drawn = {k: v for k, v in model.state_dict().items() if k.endswith("projection")}
    assert all(torch.equal(drawn[k], redrawn[k]) for k in drawn)
    ema = {k: v for k, v in load_file(tmp_path / "redrawn" / "ema.safetensors").items() if k.endswith("projection")}
    assert all(torch.equal(ema[k], redrawn[k]) for k in ema) and len(ema) == 2


def test_feature_redraw_is_refused_for_a_model_without_random_features(tmp_path):
    from polyattn.train.config import build_config
    from polyattn.train.loop import train

    config = build_config("llama_lm_shakespeare", ["model=linear_lm_nano", "model.dim=32", "model.depth=1",
                                                   "data.seq_len=16", "train.max_steps=1", "train.progress=false",
                                                   "train.feature_redraw_every=2", f"train.out_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"has none \(only model.mixer=performer has\); set it to null"):
        train(config, evaluate=False)
    assert not any(tmp_path.iterdir())  # refused before the run directory exists
