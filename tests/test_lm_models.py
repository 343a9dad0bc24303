"""Contracts of every registered causal LM: causality, padding, packing, cached decoding and generation."""

import pytest
import torch

import polyattn
from polyattn.data.text import pack_documents, pad_documents
from polyattn.models.generation import sample_next
from polyattn.ops.losses import cross_entropy
from polyattn.testing import decode_in_steps


def _one_per_class(names):
    """One variant per model class: the sizes of a family share all code paths, and tiny_lm sets the size."""
    from polyattn.registry import get_entry

    seen = {}
    for name in names:
        seen.setdefault(get_entry(name).cls, name)
    return sorted(seen.values())


# Options that change the computation of a registered model, checked against the same contracts: LongLoRA
# S²-Attn kept at inference (groups of 6, so T = 21 crosses several boundaries of both head halves).
OPTIONS = {"llama_lm_nano+s2": ("llama_lm_nano", dict(s2_group_size=6, s2_at_inference=True)),
           # every kernelized linear attention as the token mixer of the LightNet LM body (issue #17 §2)
           **{f"lightnet_lm_nano+{k}": ("lightnet_lm_nano", dict(mixer=k))
              for k in ("linear_elu", "linear_relu", "performer", "cosformer", "hedgehog")},
           # LightNet's output gate after the per-head norm, at full rank (issue #18's knob sweep)
           "lightnet_lm_nano+gate": ("lightnet_lm_nano", dict(gate_position="post", gate_low_rank_dim=32))}
LMS = _one_per_class(polyattn.list_models("causal_lm")) + sorted(OPTIONS)
V = 61  # a vocabulary size that is not a power of two


def tiny_lm(name: str, **overrides):
    """The model at a test size; LightNet with short chunks so that T = 21 spans several of them."""
    from polyattn.registry import get_entry

    name, options = OPTIONS.get(name, (name, {}))
    params = get_entry(name).parameters()
    args = {k: v for k, v in dict(vocab_size=V, dim=32, depth=2, num_heads=2, chunk_size=8).items() if k in params}
    torch.manual_seed(0)
    return polyattn.create_model(name, **{**args, **options, **overrides}).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", LMS)
def test_changing_token_j_changes_nothing_before_j(name):
    model = tiny_lm(name)
    x = tokens(2, 21)
    ref = model(x)
    for j in (0, 9, 20):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % V
        out = model(y)
        torch.testing.assert_close(out[:, :j], ref[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, j:], ref[:, j:]), "the changed token had no effect at all"


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("split", [1, 8, 13, 20])
def test_prefix_split_into_two_cached_calls_equals_one_call(name, split):
    model = tiny_lm(name)
    x = tokens(2, 21)
    full = model(x)
    first, cache = model.forward_cached(x[:, :split])
    second, cache = model.forward_cached(x[:, split:], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=2e-5, rtol=1e-4)
    one_call, _ = model.forward_cached(x)
    torch.testing.assert_close(one_call, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", LMS)
def test_token_by_token_decoding_equals_the_full_forward(name):
    model = tiny_lm(name)
    x = tokens(2, 13)
    full = model(x)
    steps = [logits for logits, _ in decode_in_steps(model, x, 3)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_the_rows_alone(name, side):
    model = tiny_lm(name)
    docs = [tokens(1, n, seed=n)[0] for n in (5, 17, 11)]
    x, mask = pad_documents(docs, side=side)
    out = model(x, attention_mask=mask)
    for i, doc in enumerate(docs):
        alone = model(doc[None])[0]
        torch.testing.assert_close(out[i][mask[i]], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", LMS)
def test_packed_equals_padded_forward_and_backward(name):
    model = tiny_lm(name).train()
    docs = [tokens(1, n, seed=n)[0] for n in (9, 3, 14)]
    padded, mask = pad_documents(docs, side="right")
    packed, cu_seqlens = pack_documents(docs)
    targets_pad = torch.where(mask, torch.roll(padded, -1, 1), -100)
    targets_pad[:, -1] = -100
    for i, d in enumerate(docs):  # the last token of each document predicts nothing
        targets_pad[i, len(d) - 1] = -100
    targets_pack = torch.cat([targets_pad[i, :len(d)] for i, d in enumerate(docs)])[None]

    logits_pad, loss_pad = model(padded, targets_pad, attention_mask=mask)
    grads_pad = torch.autograd.grad(loss_pad, list(model.parameters()))
    logits_pack, loss_pack = model(packed, targets_pack, cu_seqlens=cu_seqlens)
    grads_pack = torch.autograd.grad(loss_pack, list(model.parameters()))

    torch.testing.assert_close(logits_pack[0], logits_pad[mask], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-6, rtol=1e-5)
    for (n, _), gp, gk in zip(model.named_parameters(), grads_pad, grads_pack):
        torch.testing.assert_close(gk, gp, atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", LMS)
def test_greedy_generation_with_cache_equals_without(name):
    model = tiny_lm(name)
    prompt = tokens(2, 6)
    out_c, logits_c = model.generate(prompt, 12, return_logits=True)
    out_n, logits_n = model.generate(prompt, 12, use_cache=False, return_logits=True)
    assert out_c.shape == (2, 18) and torch.equal(out_c[:, :6], prompt)
    assert torch.equal(out_c, out_n)
    torch.testing.assert_close(logits_c, logits_n, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", LMS)
def test_left_padded_prompts_generate_what_each_prompt_generates_alone(name):
    model = tiny_lm(name)
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 7)]
    x, mask = pad_documents(prompts, side="left")
    out, logits = model.generate(x, 8, attention_mask=mask, return_logits=True)
    for i, p in enumerate(prompts):
        alone, alone_logits = model.generate(p[None], 8, return_logits=True)
        assert torch.equal(out[i, -8:], alone[0, -8:])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=2e-5, rtol=1e-4)
    no_cache = model.generate(x, 8, attention_mask=mask, use_cache=False)
    assert torch.equal(no_cache, out)


@pytest.mark.parametrize("name", LMS)
def test_sampling_with_a_seed_is_reproducible_with_and_without_cache(name):
    model = tiny_lm(name)
    prompt = tokens(1, 4)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(prompt, 10, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", LMS)
def test_targets_give_the_mean_loss_over_scored_tokens_and_tied_head_works(name):
    model = tiny_lm(name)
    x = tokens(2, 10)
    y = torch.roll(x, -1, 1)
    y[0, 4:] = -100
    logits, loss = model(x, y)
    keep = y != -100
    manual = -logits.float().log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, manual)
    tied = tiny_lm(name, tie_embeddings=True)
    saved = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied.parameters())
    assert saved == V * 32 and tied(x).shape == (2, 10, V)


def test_each_layer_of_a_cache_keeps_its_own_position_counter():
    model = tiny_lm("llama_lm_nano")
    x, mask = pad_documents([tokens(1, 2)[0], tokens(1, 5)[0]], side="left")
    _, cache = model.forward_cached(x, attention_mask=mask)
    _, cache = model.forward_cached(tokens(2, 1), cache)
    assert len(cache) == 2 and all(c.key_padding_mask.sum(-1).tolist() == [3, 6] for c in cache)
    lightnet = tiny_lm("lightnet_lm_nano")
    _, state = lightnet.forward_cached(x, attention_mask=mask)
    assert [layer.offset.tolist() for layer in state.layers] == [[2, 5], [2, 5]]
    assert state.layers[0].S.dtype == torch.float32 and state.tpe.dtype == torch.float32


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(50)}
    assert draws == {1, 2}
    draws = {sample_next(logits, temperature=1.0, top_p=0.01, generator=g).item() for _ in range(20)}
    assert draws == {1}
    torch.testing.assert_close(cross_entropy(torch.zeros(1, 2, 4), torch.tensor([[1, -100]])),
                               torch.tensor(4.0).log())


def test_generate_rejects_bad_arguments():
    model = tiny_lm("llama_lm_nano")
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(tokens(2, 4), 2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    with pytest.raises(ValueError, match="top_p"):
        model.generate(tokens(1, 4), 2, temperature=1.0, top_p=0.0)
    assert model.generate(tokens(1, 4), 0).shape == (1, 4)
