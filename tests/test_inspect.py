"""`polyattn inspect`: attention maps read from the mixers' ops, the attention-map rank, and the written files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyattn import ops as polyattn_ops
from polyattn.analysis import attention_maps, attention_rank
from polyattn.analysis.attention_maps import patch_grid_map, token_layout
from polyattn.analysis.inspect_run import spread_over_classes
from polyattn.cli import main
from polyattn.errors import UserError
from polyattn.layers import mixer_hooks
from polyattn.layers.attention import Attention
from polyattn.layers.lightnet import LightNetAttention
from polyattn.layers.linear_attention import LinearAttention
from polyattn.ops.linear_attn import feature_map_fn
from polyattn.registry import create_model
from polyattn.train.config import build_config, save_yaml
from polyattn.train.loop import train

# ---- attention-map rank ------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 10, 64, 197])
def test_rank_of_the_identity_is_where_80_percent_of_the_diagonal_is_reached(T):
    assert int(attention_rank(torch.eye(T))) == math.ceil(0.8 * T)
    assert int(attention_rank(torch.eye(T), threshold=1.0)) == T


def test_rank_of_rank_one_and_zero_maps():
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(50, 1, generator=g), torch.rand(1, 50, generator=g)
    assert int(attention_rank(u @ v)) == 1
    uniform = torch.full((65, 65), 1 / 65)  # the map of attention that has not learned anything
    assert int(attention_rank(uniform)) == 1
    assert int(attention_rank(torch.zeros(7, 7))) == 0
    # batched: one rank per leading index; singular values 4, 3, 2, 1 → 80 % of 10 reached at the 3rd
    diag = torch.diag(torch.tensor([4.0, 1.0, 3.0, 2.0]))
    ranks = attention_rank(torch.stack([diag, torch.eye(4), u[:4] @ v[:, :4]]))
    assert ranks.tolist() == [3, 4, 1]
    with pytest.raises(ValueError, match="threshold"):
        attention_rank(diag, threshold=0.0)


# ---- maps read from the ops --------------------------------------------------------------------------------

def test_softmax_maps_are_the_masked_attention_probabilities():
    torch.manual_seed(0)
    layer = Attention(32, 4, mask_mode="causal").eval()
    x = torch.randn(2, 6, 32)
    maps = attention_maps(layer, x)[""]  # (B, H, T, T); the layer itself is the mixer named ""
    q = layer.q_proj(x).unflatten(-1, (4, 8)).transpose(1, 2)
    k = layer.k_proj(x).unflatten(-1, (4, 8)).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~torch.ones(6, 6).tril().bool(), float("-inf"))
    assert torch.allclose(maps, logits.softmax(-1), atol=1e-6)
    # the map reproduces the layer's mixing of the values
    v = layer.v_proj(x).unflatten(-1, (4, 8)).transpose(1, 2)
    out, _ = layer(x)
    assert torch.allclose(layer.o_proj((maps @ v).transpose(1, 2).flatten(2)), out, atol=1e-5)


def test_lightnet_map_is_query_times_keys_soft_maxed_over_tokens():
    torch.manual_seed(0)
    layer = LightNetAttention(32, 2, causal=False, lrpe=None, scale=0.5).eval()
    x = torch.randn(2, 9, 32)
    maps = attention_maps(layer, x)[""]  # (B, H, T, S)
    q = F.silu(layer.q_proj(x)).view(2, 9, 2, 16)
    k = layer.k_proj(x).view(2, 9, 2, 16).softmax(dim=1)  # over the tokens, per channel
    expected = 0.5 * torch.einsum("bthi,bshi->bhts", q, k)  # A[t, s] = scale · Σ_i q_t[i] softmax_s(k[:, i])[s]
    assert torch.allclose(maps, expected, atol=1e-6)
    assert not torch.allclose(maps.sum(-1), torch.ones(2, 2, 9))  # not row-normalised
    with_lrpe = LightNetAttention(32, 2, causal=False, lrpe="cosine", grid_shape=(3, 3)).eval()
    assert attention_maps(with_lrpe, x)[""].shape == (2, 2, 9, 9)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_map_is_the_normalised_feature_kernel(causal):
    torch.manual_seed(0)
    layer = LinearAttention(32, 2, causal=causal, feature_map="elu").eval()
    x = torch.randn(2, 7, 32)
    maps = attention_maps(layer, x)[""]  # (B, H, T, S)
    phi = feature_map_fn(layer.feature_map)
    q = phi(layer.q_proj(x).view(2, 7, 2, 16) * 16**-0.25, None)
    k = phi(layer.k_proj(x).view(2, 7, 2, 16) * 16**-0.25, None)
    kernel = torch.einsum("bthf,bshf->bhts", q, k)
    if causal:
        kernel = kernel.tril()
    expected = kernel / (kernel.sum(-1, keepdim=True) + layer.eps)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 7), atol=1e-4)  # elu+1 is positive: rows sum to 1
    if causal:
        assert (maps.triu(1) == 0).all()


class OwnMixer(nn.Module):
    """A mixer outside polyattn.layers that reaches its op its own way (an attribute, here a counting wrapper of
    `polyattn.ops.softmax_attention`), reporting it through the hook point."""

    def __init__(self, op=polyattn_ops.softmax_attention):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.op = op

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 8).unbind(2)
        return mixer_hooks.call_op(self, self.op, q, k, v, mask_mode="causal").flatten(2)


class TwoMixers(nn.Module):
    def __init__(self, op=polyattn_ops.softmax_attention):
        super().__init__()
        self.attn = Attention(16, 2)
        self.own = OwnMixer(op)

    def forward(self, x):
        return self.own(self.attn(x)[0])


def test_a_layer_that_imports_its_op_another_way_is_read():
    torch.manual_seed(0)
    model = TwoMixers().eval()
    x = torch.randn(2, 5, 16)
    maps = attention_maps(model, x)
    assert list(maps) == ["attn", "own"]
    h = model.attn(x)[0]
    q, k, _ = model.own.qkv(h).view(2, 5, 3, 2, 8).unbind(2)
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    expected = logits.masked_fill(~torch.ones(5, 5).tril().bool(), float("-inf")).softmax(-1)
    assert torch.allclose(maps["own"], expected, atol=1e-6)


def test_a_known_mixer_that_stops_reporting_its_op_is_an_error(monkeypatch):
    """The failure the hook point replaces: a mixer whose op the analysis does not see is named, not skipped."""
    import polyattn.layers.attention as attention_layer

    monkeypatch.setattr(attention_layer, "call_op", lambda layer, op, *args, **kwargs: op(*args, **kwargs))
    with pytest.raises(UserError, match=r"^The mixer layer\(s\) attn ran without reporting their op"):
        attention_maps(TwoMixers(), torch.randn(1, 4, 16))


def test_without_an_observer_the_hook_computes_nothing_extra():
    calls = []

    def counted(q, k, v, **kwargs):
        calls.append(v.shape)
        return polyattn_ops.softmax_attention(q, k, v, **kwargs)

    model = TwoMixers(counted).eval()
    x = torch.randn(2, 5, 16)
    model(x)
    assert calls == [(2, 5, 2, 8)]  # the op once, nothing else
    q = torch.randn(1, 3, 2, 8)
    out = polyattn_ops.softmax_attention(q, q, q)
    assert mixer_hooks.call_op(model.own, lambda *a, **kw: out, q, q, q) is out  # the op's own result, untouched
    calls.clear()
    attention_maps(model, x)
    assert calls == [(2, 5, 2, 8), (2, 5, 2, 5)]  # observed: the op, then its probe with one-hot values
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"), mixer_hooks.observe_mixer_ops(lambda call: None):
        raise RuntimeError("boom")
    model(x)
    assert calls == [(2, 5, 2, 8)] and mixer_hooks._observers == ()  # detached again, also after an error


@pytest.mark.parametrize("name, kwargs, query", [
    ("vit_nano", {}, 0),
    ("illama_nano", {"mask_mode": "causal"}, 16),
    ("lightnet_vision_nano", {}, None),
    ("multiscan_vision_nano", {}, None),
    ("linear_vision_nano", {}, None),
])
def test_maps_of_every_vision_family(name, kwargs, query):
    torch.manual_seed(0)
    model = create_model(name, img_size=16, patch_size=4, num_classes=3, depth=2, **kwargs)
    maps = attention_maps(model, torch.randn(2, 3, 16, 16))
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    layout = token_layout(model, (16, 16))
    assert layout.query == query and layout.grid == (4, 4)
    for m in maps.values():
        assert m.shape[-2:] == (layout.num_tokens, layout.num_tokens) and torch.isfinite(m).all()
        assert patch_grid_map(m, layout).shape == (2, 4, 4)
    if name == "illama_nano":  # causal with the class token last: it sees every patch, patches see no later one
        m = maps["blocks.0.attn"]
        assert (m.triu(1) == 0).all() and (m[:, :, -1] > 0).all()
    assert model.training  # the mode is restored


def test_spread_over_classes():
    labels = torch.tensor([2, 2, 0, 1, 0, 2, 1])
    assert spread_over_classes(labels, 5).tolist() == [2, 3, 0, 4, 6]
    assert spread_over_classes(labels, 50).tolist() == [2, 3, 0, 4, 6, 1, 5]


# ---- the command ---------------------------------------------------------------------------------------------

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
        "train.batch_size=64", "train.progress=false", "train.max_steps=2"]


@pytest.mark.parametrize("model", ["vit_nano", "illama_nano", "lightnet_vision_nano"])
def test_inspect_writes_maps_ranks_and_calibration(model, tmp_path, cache_dir, capsys):
    train(build_config("default", [f"model={model}", *TINY, f"train.out_dir={tmp_path}", "train.run_name=r"]))
    run = tmp_path / "r"
    assert main(["inspect", str(run), "--n-images", "3", "--rank-images", "10"]) == 0
    assert "rank layer 1" in capsys.readouterr().out
    out = run / "inspect"
    for name in ("inspect.json", "reliability.png", "attention_rank.png", "attention/image_0.png",
                 "attention/image_2.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / "attention" / "image_3.png").exists()
    report = json.loads((out / "inspect.json").read_text())
    tokens = report["attention"]["tokens"]
    assert tokens == (4 if model == "lightnet_vision_nano" else 5)  # a 2x2 grid, plus the class token
    assert [layer["layer"] for layer in report["attention"]["layers"]] == ["blocks.0.attn", "blocks.1.attn"]
    for layer in report["attention"]["layers"]:
        assert 1 <= layer["rank"] <= tokens
        assert len(layer["rank_per_head"]) == 2 and all(1 <= r <= tokens for r in layer["rank_per_head"])
    metrics = report["metrics"]
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["count"] == sum(report["reliability"]["count"])
    assert len(report["attention"]["figures"]) == 3


def test_inspect_errors_are_one_sentence(tmp_path, cache_dir, capsys):
    def error(*argv):
        assert main(["inspect", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "not a polyattn run directory" in error(str(tmp_path))
    assert "does not exist" in error(str(tmp_path / "missing"))
    lm = tmp_path / "lm"
    save_yaml({"model": {"name": "llama_lm_nano"}}, lm / "config.yaml")
    assert "needs an image classifier run" in error(str(lm))
    unfinished = tmp_path / "unfinished"
    save_yaml(build_config("default", []).to_dict(), unfinished / "config.yaml")
    assert "neither final weights nor a checkpoint" in error(str(unfinished))
