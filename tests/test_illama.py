"""iLLaMA (arXiv 2404.06773): the checklist of spec illama.md §10 at model level.

Operator-level mask tests live in test_ops_attention.py; here the masks are checked through the whole model
(class-token placement, RoPE positions, soft-mask input), at tiny widths.
"""

import itertools
import math

import pytest
import torch

import polyattn
from polyattn.layers.mlp import llama_hidden_size
from polyattn.layers.pos_embed import resample_abs_pos_embed
from polyattn.models.illama import ILLaMA, convert_reference_state_dict
from polyattn.registry import count_parameters
from polyattn.train.optim import param_groups


def tiny_illama(**kw) -> ILLaMA:
    """16 px images, 4 px patches: 16 patches + cls, D=32, 2 heads of 16, 2 blocks."""
    args = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2, ffn_multiple_of=32)
    args.update(kw)
    return ILLaMA(**args)


def same_weights(a: ILLaMA, b: ILLaMA, strict: bool = True) -> ILLaMA:
    b.load_state_dict(a.state_dict(), strict=strict)
    return b.eval()


def sharpen(model: ILLaMA, factor: float = 30.0) -> ILLaMA:
    """Scales the q and k weights: at init (std 0.02) attention is nearly uniform and position effects tiny."""
    for blk in model.blocks:
        blk.attn.q_proj.weight.data.mul_(factor), blk.attn.k_proj.weight.data.mul_(factor)
    return model


def perturb_patch(x: torch.Tensor, index: int, patch: int = 4) -> torch.Tensor:
    """`x` with the pixels of raster patch `index` replaced by noise (only that patch token changes)."""
    y = x.clone()
    cols = x.shape[-1] // patch
    r, c = divmod(index, cols)
    y[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = torch.randn(x.shape[0], x.shape[1], patch, patch)
    return y


# --- §10.1 parameter counts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("illama_femto", 2_619_112), ("illama_nano", 3_407_848), ("illama_tiny", 5_701_096),
    ("illama_small", 22_018_024), ("illama_base", 86_502_376), ("illama_large", 310_445_032),
])
def test_parameter_counts_224(name, expected):
    assert count_parameters(name) == expected


@pytest.mark.parametrize("name, expected", [("illama_base", 86_794_216), ("illama_large", 310_834_152)])
def test_parameter_counts_384(name, expected):
    assert count_parameters(name, img_size=384) == expected


@pytest.mark.parametrize("name, expected", [
    ("illama_femto", 2_382_346), ("illama_nano", 3_171_082), ("illama_tiny", 5_346_442),
])
def test_parameter_counts_cifar(name, expected):
    assert count_parameters(name, img_size=32, patch_size=4, num_classes=10) == expected


def test_parameter_formula_and_biases():
    # spec §5 formula, and §1.8: only the SwiGLU linears lack biases
    D, depth, P, C, N = 64, 3, 8, 11, 16
    h = llama_hidden_size(D)
    model = tiny_illama(img_size=32, patch_size=P, num_classes=C, embed_dim=D, depth=depth, ffn_multiple_of=256)
    formula = depth * (4 * D * D + 4 * D + 2 * D + 3 * D * h) + 3 * P * P * D + D + D + (N + 1) * D + D + D * C + C
    assert sum(p.numel() for p in model.parameters()) == formula
    blk = model.blocks[0]
    assert all(m.bias is not None for m in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.attn.o_proj))
    assert all(m.bias is None for m in (blk.mlp.w1, blk.mlp.w2, blk.mlp.w3))
    assert model.patch_embed.proj.bias is not None and model.head.bias is not None


# --- §10.2 FFN hidden sizes and the RoPE table ----------------------------------------------------------------------

@pytest.mark.parametrize("name, hidden", [
    ("illama_femto", 512), ("illama_nano", 512), ("illama_tiny", 512), ("illama_small", 1024),
    ("illama_base", 2048), ("illama_large", 2816),
])
def test_ffn_hidden_and_rope_table(name, hidden):
    with torch.device("meta"):
        model = polyattn.create_model(name, depth=1)
    assert model.blocks[0].mlp.w1.out_features == hidden == model.blocks[0].mlp.w3.out_features
    assert model.head_dim == 64
    rot = model.rotary(model.patch_embed.num_patches + 1, device="cpu")
    assert rot.cos.shape == (197, 32) and rot.interleaved


def test_rope_cls_at_position_n():
    model = tiny_illama()
    N = model.patch_embed.num_patches
    rot = model.rotary(N + 1)
    theta = 10000.0 ** (-torch.arange(0, model.head_dim, 2, dtype=torch.float64) / model.head_dim)
    torch.testing.assert_close(rot.cos[N], torch.cos(N * theta).float())  # the last (cls) row is position N
    torch.testing.assert_close(rot.sin[N], torch.sin(N * theta).float())


def test_rope_is_applied():
    # With RoPE only (no learned table) and bidirectional attention, the position information comes from RoPE
    # alone: swapping two patches must change the class token's output (it would not without positions).
    model = sharpen(tiny_illama(pos_embed="rope", mask_mode="bidirectional")).eval()
    x = torch.randn(1, 3, 16, 16)
    swapped = x.clone()
    swapped[..., :4, :4], swapped[..., :4, 4:8] = x[..., :4, 4:8], x[..., :4, :4]
    assert (model.forward_features(x)[:, -1] - model.forward_features(swapped)[:, -1]).abs().max() > 1e-3
    blind = same_weights(model, tiny_illama(pos_embed="learned", mask_mode="bidirectional"), strict=False)
    blind.pos_embed.data.zero_()  # no positions at all: the class token is permutation-invariant
    torch.testing.assert_close(blind(x), blind(swapped), atol=1e-5, rtol=1e-5)


# --- §10.4, §10.5 masks through the model ----------------------------------------------------------------------------

def test_causal_cls_last_patch_outputs_ignore_later_patches():
    model = tiny_illama(mask_mode="causal").eval()
    x = torch.randn(2, 3, 16, 16)
    j = 9
    a, b = model.forward_features(x), model.forward_features(perturb_patch(x, j))
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-6, rtol=0)  # patches 0..j-1 never see patch j
    assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-4)
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)  # the cls row (last) sees every patch


def test_causal_cls_last_patches_never_see_cls():
    model = tiny_illama(mask_mode="causal").eval()
    x = torch.randn(1, 3, 16, 16)
    a = model.forward_features(x)
    model.cls_token.data.normal_()
    b = model.forward_features(x)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=1e-6, rtol=0)


def test_illama_soft_leaks_at_a0():
    # The released operator zeroes future weights after the softmax: patch 0's output still depends on later
    # patches through the softmax denominator (spec §3). This documents the semantics.
    # float64, so that the leak (a gain of ~1e-5 at this scale) stands far above rounding noise
    soft = sharpen(tiny_illama(mask_mode="illama_soft"), factor=4.0).double().eval()
    causal = same_weights(soft, tiny_illama(mask_mode="causal").double())
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    y = perturb_patch(x, 15)
    assert (soft.forward_features(x)[:, 0] - soft.forward_features(y)[:, 0]).abs().max() > 1e-7
    assert (causal.forward_features(x)[:, 0] - causal.forward_features(y)[:, 0]).abs().max() < 1e-12


def test_cls_first_causal_cls_ignores_every_patch():
    # The roadmap's failure mode (doit3): with cls at position 0 under a causal mask the class token sees only
    # itself, so every image gets the same logits.
    model = tiny_illama(mask_mode="causal", cls_position="first").eval()
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.forward_features(x)[:, 0], model.forward_features(y)[:, 0], atol=1e-6, rtol=0)
    logits = model(x)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=0)
    model = same_weights(model, tiny_illama(mask_mode="causal", cls_position="last"))
    assert not torch.allclose(model(x)[0], model(x)[1], atol=1e-4)


@pytest.mark.parametrize("mode, a, equals", [
    ("illama_soft", 1.0, "bidirectional"), ("soft_causal", 1.0, "bidirectional"), ("soft_causal", 0.0, "causal"),
])
def test_soft_modes_limits(mode, a, equals):
    soft = tiny_illama(mask_mode=mode).eval()
    ref = same_weights(soft, tiny_illama(mask_mode=equals))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(soft(x, soft_mask_a=a), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(soft(x, soft_mask_a=torch.tensor(a)), ref(x), atol=1e-5, rtol=1e-5)


def test_soft_mask_a_is_an_input_not_state():
    model = tiny_illama().eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    assert not torch.allclose(model(x, soft_mask_a=1.0), before, atol=1e-5)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # the default a = 0 is used again
    assert model.mask_mode.value == "illama_soft"


# --- §10.8 other resolutions -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_position", ["last", "first"])
def test_pos_embed_224_to_384_keeps_cls_slot(cls_position):
    kw = dict(patch_size=16, num_classes=3, embed_dim=64, depth=1, num_heads=1, ffn_multiple_of=64,
              cls_position=cls_position)
    small, large = ILLaMA(img_size=224, **kw), ILLaMA(img_size=384, **kw)
    large.load_state_dict(small.state_dict())  # resampled on load
    old, new = small.pos_embed.detach(), large.pos_embed.detach()
    assert old.shape[1] == 197 and new.shape[1] == 577
    cls_slot = -1 if cls_position == "last" else 0
    torch.testing.assert_close(new[:, cls_slot], old[:, cls_slot], atol=0, rtol=0)
    grid = old[:, :-1] if cls_position == "last" else old[:, 1:]
    expected = resample_abs_pos_embed(torch.cat([old[:, cls_slot:][:, :1], grid], 1), (24, 24), (14, 14))[:, 1:]
    new_grid = new[:, :-1] if cls_position == "last" else new[:, 1:]
    torch.testing.assert_close(new_grid, expected)
    assert large.rotary(577).cos.shape == (577, 32)
    # a 224-px model run on 384-px images resamples the same way on the fly
    x = torch.randn(1, 3, 384, 384)
    small.eval(), large.eval()
    torch.testing.assert_close(small(x), large(x), atol=1e-5, rtol=1e-5)


def test_another_resolution_forward_and_backward():
    model = tiny_illama()
    out = model(torch.randn(2, 3, 24, 32), soft_mask_a=0.5)  # 6x8 patches, non-square
    assert out.shape == (2, 5)
    out.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


# --- §10.7 weight decay, checkpoints, arguments -----------------------------------------------------------------------

def test_weight_decay_exclusions():
    model = tiny_illama()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys()
    groups = param_groups(model, weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {n for n, p in names.items() if id(p) not in no_decay}
    assert decayed == {n for n, p in names.items() if p.ndim >= 2 and n not in ("pos_embed", "cls_token")}
    assert "blocks.0.attn.q_proj.bias" not in decayed and "blocks.0.norm1.weight" not in decayed
    assert tiny_illama(pos_embed="rope").no_weight_decay() == {"cls_token"}


def test_reference_checkpoint_names_load():
    model = tiny_illama().eval()
    official = {}
    for name, value in model.state_dict().items():  # rebuild the official layout: fused qkv, fc1/fc2/fc3, proj
        if ".attn.q_proj." in name:
            parts = [model.state_dict()[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            official["module." + name.replace("q_proj", "qkv")] = torch.cat(parts, 0)
        elif ".attn.k_proj." in name or ".attn.v_proj." in name:
            continue
        else:
            name = name.replace("o_proj", "proj").replace("mlp.w1", "mlp.fc1").replace("mlp.w2", "mlp.fc2")
            official["module." + name.replace("mlp.w3", "mlp.fc3")] = value
    assert any(".attn.qkv." in k for k in official)
    fresh = tiny_illama().eval()
    fresh.load_state_dict(convert_reference_state_dict(official))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="cls_position"):
        tiny_illama(cls_position="middle")
    with pytest.raises(ValueError, match="pos_embed"):
        tiny_illama(pos_embed="sincos")
    with pytest.raises(polyattn.UserError, match="mask_mode"):
        tiny_illama(mask_mode="casual")


def test_drop_path_rises_linearly():
    model = tiny_illama(depth=5, drop_path_rate=0.2)
    rates = [blk.drop_path.p for blk in model.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.2)
    assert all(math.isclose(b - a, 0.05) for a, b in itertools.pairwise(rates))
