"""Small layers: RMSNorm, GroupRMSNorm, the MLPs, DropPath, PatchEmbed."""

import pytest
import torch
import torch.nn.functional as F

from polyattn.errors import UserError
from polyattn.layers.drop import DropPath
from polyattn.layers.mlp import GatedMlp, Mlp, llama_hidden_size
from polyattn.layers.norm import GroupRMSNorm, RMSNorm
from polyattn.layers.patch_embed import PatchEmbed
from polyattn.testing import assert_close


def rms_ref(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_matches_formula(dtype):
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = (torch.randn(3, 5, 24) * 1e-2).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    ratio = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close("rmsnorm", rms_ref(x, norm.weight, 1e-5), y, ratio=ratio, atol=0.0)
    assert RMSNorm(24, elementwise_affine=False).weight is None
    assert_close("no affine", rms_ref(x, torch.ones(24), 1e-6), RMSNorm(24, elementwise_affine=False)(x),
                 ratio=ratio, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_group_rmsnorm_normalises_each_group(dtype):
    norm = GroupRMSNorm(24, groups=3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(2, 4, 24)
    x[..., 8:16] *= 100  # groups of very different scale must be normalised independently
    x = x.to(dtype)
    y = norm(x)
    expected = torch.cat([rms_ref(x[..., 8 * g:8 * (g + 1)], norm.weight[8 * g:8 * (g + 1)], 1e-6)
                          for g in range(3)], dim=-1)
    assert y.dtype == dtype
    assert_close("group rmsnorm", expected, y, ratio=1e-6 if dtype == torch.float32 else 1e-2, atol=0.0)
    with pytest.raises(ValueError, match="divisible"):
        GroupRMSNorm(24, groups=5)


def test_gated_mlp_is_swiglu():
    mlp = GatedMlp(16, 40)
    x = torch.randn(2, 3, 16)
    expected = mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x))
    assert_close("swiglu", expected, mlp(x), ratio=1e-6, atol=1e-7)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    mlp = Mlp(16, 40)
    assert_close("mlp", mlp.fc2(F.gelu(mlp.fc1(x))), mlp(x), ratio=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim,hidden", [(128, 512), (192, 512), (384, 1024), (768, 2048), (1024, 2816)])
def test_llama_hidden_size(dim, hidden):
    assert llama_hidden_size(dim) == hidden


def test_drop_path():
    x = torch.ones(4000, 3, 2)
    dp = DropPath(0.25)
    dp.eval()
    assert dp(x) is x
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    per_sample = y.flatten(1)
    # whole samples are dropped or kept (rescaled by 1/(1-p))
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(y.mean().item() - 1.0) < 0.05
    assert DropPath(0.0).train()(x) is x
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_patch_embed_shapes_and_raster_order():
    pe = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=1, embed_dim=1, bias=False)
    assert pe.grid_size == (2, 3) and pe.num_patches == 6
    with torch.no_grad():
        pe.proj.weight.zero_()
        pe.proj.weight[0, 0, 0, 0] = 1.0  # reads the top-left pixel of each patch
    img = torch.zeros(2, 1, 8, 12)
    for r in range(2):
        for c in range(3):
            img[:, 0, 4 * r, 4 * c] = 10 * r + c
    tokens = pe(img)
    assert tokens.shape == (2, 6, 1)
    assert tokens[0, :, 0].tolist() == [0, 1, 2, 10, 11, 12]  # row-major
    # other sizes that divide are accepted
    assert pe(torch.zeros(1, 1, 16, 4)).shape == (1, 4, 1)


def test_patch_embed_rejects_bad_sizes():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    with pytest.raises(UserError, match="not divisible"):
        pe(torch.zeros(1, 3, 30, 32))
    with pytest.raises(UserError, match="not divisible"):
        PatchEmbed(img_size=30, patch_size=8)
    with pytest.raises(UserError, match="Expected images"):
        pe(torch.zeros(1, 1, 32, 32))


def test_the_convolutional_stem_reaches_the_patch_grid_through_stride_2_convolutions():
    pe = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=16, stem="conv")
    convs = [m for m in pe.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(3, 8, (2, 2)), (8, 16, (2, 2))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in pe.convs) == 2 and pe.proj.kernel_size == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    assert pe(x).shape == (2, 64, 16) and pe.grid_size == (8, 8)
    assert pe.eval()(torch.randn(1, 3, 16, 24)).shape == (1, 4 * 6, 16)  # any size the patch divides
    # a token sees only its own patch and the pixels around it: a change in one corner leaves far tokens alone
    y = x.clone()
    y[:, :, :4, :4] += 1.0
    moved = (pe(y) - pe(x)).abs().amax(dim=(0, 2)).view(8, 8) > 0
    assert moved[0, 0] and not moved[2:].any() and not moved[:, 2:].any()
    for bad in (3, 6, (4, 2), 1):
        with pytest.raises(UserError, match="power of two"):
            PatchEmbed(img_size=48, patch_size=bad, stem="conv")
    with pytest.raises(UserError, match="stem"):
        PatchEmbed(img_size=32, patch_size=4, stem="convolution")


def test_the_resnet_stem_adds_a_residual_basic_block_after_each_stride_2_convolution():
    from polyattn.layers.patch_embed import BasicBlock
    pe = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=16, stem="resnet")
    blocks = [m for m in pe.convs if isinstance(m, BasicBlock)]
    assert [b.body[0].in_channels for b in blocks] == [8, 16]  # one per stage, at the stage's width
    assert all(c.stride == (1, 1) for b in blocks for c in b.body if isinstance(c, torch.nn.Conv2d))
    x = torch.randn(2, 3, 32, 32)
    assert pe(x).shape == (2, 64, 16) and pe.grid_size == (8, 8)
    # the skip: with the block's body silenced, the block passes its (non-negative) input through unchanged
    block = blocks[0].eval()
    torch.nn.init.zeros_(block.body[-1].weight)
    h = torch.relu(torch.randn(1, 8, 5, 5))
    torch.testing.assert_close(block(h), h)
    # wider than the plain stem's reach (one token), still local: each block widens its stage's view by two
    # positions each way, so a change in the first 4x4 pixels reaches tokens 0-4 along each axis and no further
    pe.eval()
    y = x.clone()
    y[:, :, :4, :4] += 1.0
    moved = (pe(y) - pe(x)).abs().amax(dim=(0, 2)).view(8, 8) > 0
    assert moved[0, 0] and moved[3, 3] and not moved[5:].any() and not moved[:, 5:].any()
