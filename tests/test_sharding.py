"""The units of activation checkpointing and FSDP (`polyattn.train.sharding`), and FSDP2 and DCP checkpoints in one
process group of one process (gloo), against the plain model: the same forward, gradients and weights. The
2-process runs are in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from polyattn import create_model
from polyattn.errors import UserError
from polyattn.train.sharding import check_fsdp, full_state_dict, gathered, repeated_blocks, shard_model

VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=8, patch_size=4, num_classes=3)
TEXT = dict(vocab_size=64, dim=32, depth=3, num_heads=2, max_seq_len=16, num_latents=8)


def test_the_repeated_blocks_are_those_a_model_calls():
    vit = create_model("vit_nano", **VIT)
    assert repeated_blocks(vit) == list(vit.blocks)
    assert repeated_blocks(create_model("vit_nano", **VIT, reversible=True)) == []  # entered through branches
    assert repeated_blocks(create_model("perceiver_ar_nano", **TEXT)) == []  # every layer run through its parts
    compressed = create_model("perceiver_compressed_nano", **TEXT, compressed_len=4)
    assert repeated_blocks(compressed) == list(compressed.blocks[1:])  # layer 0: compressed between sub-layers
    dit = create_model("dit_nano", depth=2, embed_dim=32, num_heads=2, img_size=8, conditioning="cross_attention")
    assert all(callable(getattr(b, name)) for b in repeated_blocks(dit) for name in b.entry_methods)


def test_fsdp_refuses_what_it_cannot_do_in_one_sentence():
    with pytest.raises(UserError, match=r"train\.ema_decay"):
        check_fsdp(ema=True, precision="fp32")
    with pytest.raises(UserError, match="bf16 or fp32"):
        check_fsdp(ema=False, precision="fp16")
    check_fsdp(ema=False, precision="bf16")


@pytest.fixture
def process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_model_computes_and_checkpoints_as_the_plain_one(process_group, tmp_path):
    from polyattn.train import build_optimizer
    from polyattn.train.checkpoint import CheckpointDir, load_checkpoint_weights
    from polyattn.train.checkpoint import rng_state as current_rng_state

    torch.manual_seed(0)
    plain = create_model("vit_nano", **VIT)
    sharded = create_model("vit_nano", **VIT)
    sharded.load_state_dict(plain.state_dict())
    assert shard_model(sharded, torch.device("cpu"), bf16=False) == 2
    x = torch.randn(4, 3, 8, 8)
    plain(x).square().mean().backward()
    sharded(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        assert torch.allclose(p.grad, q.grad.full_tensor(), atol=1e-6), name
    sharded.eval()
    with torch.no_grad(), gathered(sharded):  # full parameters: forwards without collectives
        assert torch.allclose(sharded(x), plain.eval()(x), atol=1e-6)
    weights = full_state_dict(sharded)
    assert all(type(v) is torch.Tensor and torch.equal(v, plain.state_dict()[k]) for k, v in weights.items())

    optimizer = build_optimizer(sharded, 1e-3, 0.05, (0.9, 0.999))
    optimizer.step()
    checkpoints = CheckpointDir(tmp_path)
    path = checkpoints.save_distributed(1, sharded, optimizer, {"step": 1, "rng": current_rng_state()},
                                        model_name="vit_nano")
    assert checkpoints.is_distributed(path) and checkpoints.check(path) is None and checkpoints.latest() == path
    reloaded = create_model("vit_nano", **VIT)
    load_checkpoint_weights(reloaded, path, model_name="vit_nano")
    for k, v in full_state_dict(sharded).items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    (path / "__0_0.distcp").write_bytes(b"damaged")
    assert "does not match" in checkpoints.check(path)  # the manifest covers the shard files
